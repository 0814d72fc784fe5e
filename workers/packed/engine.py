"""Numpy inference on a packed file: walks the layer records, runs the popcount kernels.

Per layer: the input quantizer (or the previous layer's folded threshold) gives bit planes
(:class:`~workers.packed.kernels.Planes`), im2col gathers them into packed rows, the kernels
(:mod:`workers.packed.kernels`: XNOR / ternary / SHIFT + popcount) give the integer accumulator
A. Zero padding of a dense ±1 input is encoded as +1 and corrected exactly:
A −= Σ_(padded taps t) Σ_c w[o, t, c]. Layers whose input is float (the raw image, or a float
last layer) are float32 matmuls, as in the trained model.

After the accumulator: a folded sign threshold ``(A ≥ U) XOR g`` with max-pooling as an OR of
the threshold bits, or float32 ``z = HT(BN(maxpool(s·A) + b))`` and the next layer's quantizer
at run time with per-sample statistics (ternary Δ = r·mean|z|, powers of two max|z|), as
torch's eval mode computes them. Activations are NHWC; no per-pixel Python loops.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .format import Encoding, LayerRecord, PackedHeader, load_packed, pack_bits, unpack_bits
from .kernels import Planes, accumulate, weight_planes

try:  # numpy's BLAS threads would fight the engine's own row split (and spin on busy cores)
    from threadpoolctl import ThreadpoolController

    _BLAS = ThreadpoolController()
except ImportError:  # pragma: no cover
    _BLAS = None

CHUNK_ELEMENTS = 65536  # rows × output channels per kernel chunk and plane pair (buffers stay in L2)
MICRO_BATCH = 64  # images per pass through the net


# -- run-time quantizers (the torch eval path, per sample) --------------------------------------
def quantize(z: np.ndarray, enc: Encoding) -> Planes:
    """The layer's input quantizer on float32 ``z`` (N, ...): sign, ternary or powers of two.

    sign: n = signbit(z) (sign(+0) = +1, sign(−0) = −1, as torch's copysign);
    ternary: non-zero ⇔ |z| > Δ, Δ = r·mean|z| per sample;
    pow2: code j = #{edges t_i ≤ |z|/max|z|} per sample, value 2^(j−q) → integer 2^(j−1) in units
    of 2^−(q−1) (code 0 = zero).
    """
    if enc.stats != "per_sample":
        raise ValueError(f"input statistics {enc.stats!r} are carried by the format but not run by this engine yet")
    neg = np.signbit(z)
    if enc.enc == "sign":
        return Planes(neg)
    red = tuple(range(1, z.ndim))
    a = np.abs(z)
    if enc.enc == "ternary":
        delta = np.float32(enc.delta_ratio) * a.mean(axis=red, dtype=np.float64, keepdims=True).astype(np.float32)
        nz = a > delta
        return Planes(neg & nz, [(0, nz)])
    if enc.enc == "pow2":
        m = np.maximum(a.max(axis=red, keepdims=True), np.finfo(np.float32).tiny)
        code = np.searchsorted(np.asarray(enc.thresholds, np.float32), a / m, side="right")
        planes = [(e, code == e + 1) for e in range(len(enc.thresholds))]
        return Planes(neg & (code > 0), [(e, p) for e, p in planes if p.any()])
    raise ValueError(f"no run-time quantizer for input encoding {enc.enc!r}")


def dequantize(op: Planes, unit: float) -> np.ndarray:
    """Bool planes → float32 levels: (1 − 2n)·Σ_e m_e·2^e·unit."""
    mag = np.float32(1) if op.masks is None else sum(m * np.float32(2.0**e) for e, m in op.masks)
    return (np.where(op.neg, np.float32(-unit), np.float32(unit)) * mag).astype(np.float32)


# -- geometry --------------------------------------------------------------------------------
def im2col(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """(N, H, W, C) → (N, OH, OW, kh·kw·C) patches, tap-major (kh, kw, C), zero padding."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # (N, OH, OW, C, kh, kw)
    n, oh, ow = win.shape[:3]
    return win.transpose(0, 1, 2, 4, 5, 3).reshape(n, oh, ow, kh * kw * x.shape[3])


def pool_windows(x: np.ndarray, k: int) -> np.ndarray:
    """(N, H, W, C) → (N, H//k, k, W//k, k, C) view (floor mode: the last odd row/column drops)."""
    n, h, w, c = x.shape
    return x[:, : h // k * k, : w // k * k].reshape(n, h // k, k, w // k, k, c)


def weight_ints(rec: LayerRecord, arrays: dict) -> np.ndarray:
    """The file's planes → (out, K) weights: int32 in level units, or float32 for float weights."""
    enc, names, k = rec.weight.enc, rec.weight_arrays, rec.K
    if enc == "float":
        return np.asarray(arrays[names.values], np.float32)
    sign = 1 - 2 * unpack_bits(arrays[names.neg], k).astype(np.int32)
    if enc == "sign":
        ints = sign
    elif enc == "ternary":
        ints = sign * unpack_bits(arrays[names.nz], k)
    else:  # pow2: code c (0 = zero) in bit planes, value 2^(c−1) in units of 2^−(q−1)
        code = sum(unpack_bits(arrays[nm], k).astype(np.int32) << b for b, nm in enumerate(names.code))
        ints = sign * np.where(code > 0, np.left_shift(1, np.maximum(code - 1, 0)), 0)
    return ints.astype(np.int32)


# -- layers ----------------------------------------------------------------------------------
class Layer:
    """One quantized (or float) conv / linear layer with what follows it, from a header record."""

    def __init__(self, rec: LayerRecord, arrays: dict, pool: ThreadPoolExecutor | None):
        self.rec, self.pool = rec, pool
        self.conv = rec.conv
        self.geom = (rec.kernel, rec.stride, rec.padding) if self.conv else None
        ints = weight_ints(rec, arrays)
        self.out = ints.shape[0]
        self.float_in = rec.a_max is None  # a float operand: float32 matmul, as the trained model
        if self.float_in:  # float weights, or quantized levels × their unit
            self.wf = (ints * np.float32(rec.weight.unit)).astype(np.float32).T.copy()
        else:
            self.w = weight_planes(ints, rec.weight.enc)
            # Σ_c w[o, t, c] per tap t: what a +1-encoded padded input position adds
            taps = rec.kernel[0] * rec.kernel[1] if self.conv else None
            self.tap_sums = ints.reshape(self.out, taps, -1).sum(2) if self.conv else None
        get = lambda name: None if name is None else np.asarray(arrays[name])  # noqa: E731
        self.alpha, self.beta = (get(rec.bn.alpha), get(rec.bn.beta)) if rec.bn else (None, None)
        self.bias = get(rec.bias)
        self.u, self.g = (get(rec.fold.u), get(rec.fold.g).astype(bool)) if rec.fold else (None, None)
        self._corr: dict[tuple[int, int], np.ndarray] = {}

    # accumulators
    def _rows(self, x: np.ndarray) -> np.ndarray:
        """Conv patches (N, OH, OW, K) or linear rows (N, K) of an NHWC / (N, F) array."""
        if self.conv:
            return im2col(x, *self.geom)
        return x.reshape(len(x), -1)

    def _packed(self, plane: np.ndarray) -> np.ndarray:
        """Bool plane → packed rows (N·L, words), bit-identical to ``pack_bits`` of the patches.

        Conv inputs with C % 8 == 0 are packed per pixel first (C bits fill whole bytes, or whole
        words when C % 64 == 0) and im2col then copies bytes/words instead of bools."""
        c = plane.shape[-1]
        if not self.conv or c % 8:
            words = pack_bits(self._rows(plane))
        elif c % 64 == 0:
            words = self._rows(pack_bits(plane))
        else:
            rows = self._rows(np.packbits(plane, axis=-1, bitorder="little"))
            pad = -rows.shape[-1] % 8
            rows = np.pad(rows, ((0, 0),) * 3 + ((0, pad),)) if pad else rows
            words = np.ascontiguousarray(rows).view(np.uint64)
        return words.reshape(-1, words.shape[-1])

    def _pad_correction(self, h: int, w: int) -> np.ndarray:
        """(OH·OW, out) Σ over padded taps of Σ_c w: what +1-encoded pad positions added."""
        if (h, w) not in self._corr:
            outside = ~im2col(np.ones((1, h, w, 1), bool), *self.geom)[0]  # (OH, OW, kh·kw)
            self._corr[h, w] = outside.reshape(-1, outside.shape[-1]).astype(np.int32) @ self.tap_sums.T
        return self._corr[h, w]

    def _split_rows(self, rows: int, step: int, fn) -> None:
        """fn(start, stop) over row chunks of ``step``, on the thread pool when there is one."""
        spans = [(s, min(s + step, rows)) for s in range(0, rows, step)]
        if self.pool and len(spans) > 1:
            list(self.pool.map(lambda sp: fn(*sp), spans))
        else:
            for sp in spans:
                fn(*sp)

    def _int_acc(self, op: Planes) -> np.ndarray:
        n = len(op.neg)
        a = op.map(self._packed)
        acc = np.empty((len(a.neg), self.w.out), np.int32)
        pairs = max(1, len(a.masks or [0]) * len(self.w.masks or [0]))

        def run(s, e):
            accumulate(a.map(lambda p: p[s:e]), self.w, acc[s:e])

        self._split_rows(len(acc), max(8, CHUNK_ELEMENTS // (self.w.out * pairs)), run)
        if not self.conv:
            return acc
        h, w = op.neg.shape[1:3]
        acc = acc.reshape(n, -1, self.w.out)
        if op.masks is None and any(self.geom[2]):
            acc -= self._pad_correction(h, w)[None]
        (kh, kw), (sh, sw), (ph, pw) = self.geom
        return acc.reshape(n, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, self.w.out)

    def _float_acc(self, x: np.ndarray) -> np.ndarray:
        rows = self._rows(np.asarray(x, np.float32))
        flat = rows.reshape(-1, rows.shape[-1])
        out = np.empty((len(flat), self.wf.shape[1]), np.float32)
        self._split_rows(len(flat), max(64, CHUNK_ELEMENTS // self.wf.shape[1]),
                         lambda s, e: np.matmul(flat[s:e], self.wf, out=out[s:e]))
        return out.reshape(rows.shape[:-1] + (self.wf.shape[1],))

    # what follows the accumulator
    def _threshold(self, acc: np.ndarray) -> Planes:
        u = acc >= self.u
        if self.rec.pool:
            u = pool_windows(u, self.rec.pool).any(axis=(2, 4))
        return Planes(u == self.g)  # negative ⇔ NOT((pooled A ≥ U) XOR g)

    def _affine(self, acc: np.ndarray) -> np.ndarray:
        pool = self.rec.pool
        if self.bias is None and pool:  # max-pool the exact accumulator first
            acc = pool_windows(acc, pool).max(axis=(2, 4))
        z = acc.astype(np.float32)
        if acc.dtype != np.float32 and self.rec.unit != 1:
            z *= np.float32(self.rec.unit)
        if self.bias is not None:
            z += self.bias
            if pool:
                z = pool_windows(z, pool).max(axis=(2, 4))
        if self.alpha is not None:
            z = z * self.alpha + self.beta
        return np.clip(z, -1, 1) if self.rec.hardtanh else z

    def __call__(self, act):
        inp = self.rec.input
        if self.float_in:
            if not inp.is_float:  # quantized input, float weights
                act = dequantize(act if isinstance(act, Planes) else quantize(act, inp), inp.unit)
            acc = self._float_acc(act)
        else:
            op = act if isinstance(act, Planes) else quantize(np.asarray(act, np.float32), inp)
            acc = self._int_acc(op)
        return self._threshold(acc) if self.u is not None else self._affine(acc)


class PackedNet:
    """A packed model ready for numpy inference: ``PackedNet.load(path).logits(x)``.

    ``threads`` workers split the popcount kernel's rows (numpy releases the GIL); default: the
    CPUs available to this process. Batches run through the net ``micro_batch`` images at a time
    (smaller temporaries: less memory, fewer page faults; results do not depend on it).
    """

    def __init__(self, header: PackedHeader, arrays: dict, threads: int | None = None,
                 micro_batch: int | None = None):
        self.header = header
        self.micro_batch = micro_batch or MICRO_BATCH
        threads = threads or len(os.sched_getaffinity(0))
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.layers = [Layer(rec, arrays, self._pool) for rec in header.layers]

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, micro_batch: int | None = None) -> PackedNet:
        return cls(*load_packed(path), threads=threads, micro_batch=micro_batch)

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()

    def __enter__(self) -> PackedNet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        act = np.asarray(x, np.float32)
        if self.layers[0].conv:
            act = act.transpose(0, 2, 3, 1)  # NCHW → NHWC
        for layer in self.layers:
            act = layer(act)
        return act

    def logits(self, x, batch_size: int = 256) -> np.ndarray:
        """Float32 (N, classes) outputs for NCHW images ``x`` (numpy or CPU tensor)."""
        x = np.asarray(x, np.float32)
        step = min(batch_size, self.micro_batch)
        with _BLAS.limit(limits=1, user_api="blas") if _BLAS else contextlib.nullcontext():
            return np.concatenate([self._forward(x[s: s + step]) for s in range(0, len(x), step)])

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        return self.logits(x, batch_size).argmax(axis=1)

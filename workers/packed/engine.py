"""Inference on a packed file: walks the layer records, runs the popcount kernels (compiled or numpy).

Per layer: the input quantizer (or the previous layer's folded threshold) gives bit planes
(:class:`~workers.packed.kernels.Planes`), im2col gathers them into packed rows, the kernels
(:mod:`workers.packed.kernels`: XNOR / ternary / SHIFT + popcount) give the integer accumulator
A. Zero padding of a dense ±1 input is encoded as +1 and corrected exactly:
A −= Σ_(padded taps t) Σ_c w[o, t, c]. Layers whose input is float (the raw image, or a float
last layer) are float32 matmuls, as in the trained model.

After the accumulator: a folded sign threshold ``(A ≥ U) XOR g`` with max-pooling as an OR of
the threshold bits; a folded constant-statistic ternary / powers-of-two next quantizer (``steps``:
level ℓ = ±(#{i : max_window(A) ≥ T_i} − q), integer comparisons only, straight into the next layer's
planes); or float32 ``z = HT(BN(maxpool(s·A) + b))`` and the next layer's quantizer
at run time with per-sample statistics (ternary Δ = r·mean|z|, powers of two max|z|) or the layer's
frozen running estimate, as torch's eval mode computes them (statistics here in numpy on both backends, so that the two
backends agree bit for bit). Activations are NHWC, quantized ones packed per pixel; no per-pixel
Python loops.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .format import Encoding, LayerRecord, PackedHeader, load_packed, unpack_bits
from .kernels import CHUNK_ELEMENTS, Kernels, Planes, code_numpy, im2col, pool_windows, weight_planes

try:  # numpy's BLAS threads would fight the engine's own row split (and spin on busy cores)
    from threadpoolctl import ThreadpoolController

    _BLAS = ThreadpoolController()
except ImportError:  # pragma: no cover
    _BLAS = None

MICRO_BATCH = 64  # images per pass through the net


# -- run-time quantizers (the torch eval path, per sample) --------------------------------------
def statistic(z: np.ndarray, enc: Encoding) -> np.ndarray | None:
    """The statistic of the input quantizer on float32 ``z`` (N, ...), float32 (N,): ternary
    Δ = r·s with s = mean|z| (accumulated in float64), powers of two s = max|z| (at least the
    smallest normal float); s per sample, or the layer's constant (``stats="constant"``); None for sign."""
    if enc.enc == "sign":
        return None
    if enc.stats == "constant":
        s = np.full(len(z), enc.reference, np.float32)
    else:
        a = np.abs(z).reshape(len(z), -1)
        s = a.mean(axis=1, dtype=np.float64).astype(np.float32) if enc.enc == "ternary" else a.max(axis=1)
    if enc.enc == "ternary":
        return np.float32(enc.delta_ratio) * s
    if enc.enc == "pow2":
        return np.maximum(s, np.finfo(np.float32).tiny)
    raise ValueError(f"no run-time quantizer for input encoding {enc.enc!r}")


def quantize(z: np.ndarray, enc: Encoding) -> Planes:
    """The layer's input quantizer on float32 ``z`` (N, ...) as bool planes (see ``kernels.code_numpy``)."""
    return code_numpy(z, enc.enc, statistic(z, enc), enc.thresholds)


def dequantize(op: Planes, unit: float) -> np.ndarray:
    """Bool planes → float32 levels: (1 − 2n)·Σ_e m_e·2^e·unit."""
    mag = np.float32(1) if op.masks is None else sum(m * np.float32(2.0**e) for e, m in op.masks)
    return (np.where(op.neg, np.float32(-unit), np.float32(unit)) * mag).astype(np.float32)


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
    """One quantized (or float) conv / linear layer with what follows it, from its record."""

    def __init__(self, rec: LayerRecord, arrays: dict, kernels: Kernels):
        self.rec, self.kernels = rec, kernels
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
        self.steps = (np.ascontiguousarray(get(rec.steps.t)), get(rec.steps.g).astype(bool)) if rec.steps else None
        if rec.steps and (self.steps[0].shape, self.steps[1].shape) != ((2 * rec.steps.levels, self.out), (self.out,)):
            raise ValueError(f"{rec.name}: steps arrays {self.steps[0].shape}, {self.steps[1].shape} do not fit "
                             f"{rec.steps.levels} levels × {self.out} outputs")
        self._corr: dict[tuple[int, int], np.ndarray] = {}

    # accumulators
    def _pad_correction(self, h: int, w: int) -> np.ndarray:
        """(OH·OW, out) Σ over padded taps of Σ_c w: what +1-encoded pad positions added."""
        if (h, w) not in self._corr:
            outside = ~im2col(np.ones((1, h, w, 1), bool), *self.geom)[0]  # (OH, OW, kh·kw)
            self._corr[h, w] = outside.reshape(-1, outside.shape[-1]).astype(np.int32) @ self.tap_sums.T
        return self._corr[h, w]

    def _int_acc(self, op: Planes) -> np.ndarray:
        """Packed input planes (per pixel (N, H, W, words), or rows (N, words)) → int32 accumulators."""
        if op.neg.ndim == 2:  # a linear layer after a linear layer
            return self.kernels.accumulate(op, self.w)
        n, h, w = op.neg.shape[:3]
        geom = self.geom if self.conv else ((h, w), (1, 1), (0, 0))  # a linear layer reads the NHWC flatten
        corr = self._pad_correction(h, w) if self.conv and op.masks is None and any(self.geom[2]) else None
        acc = self.kernels.accumulate(self.kernels.gather(op, *geom), self.w, corr)
        if not self.conv:
            return acc
        (kh, kw), (sh, sw), (ph, pw) = self.geom
        return acc.reshape(n, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1, self.out)

    def _float_acc(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        rows = im2col(x, *self.geom) if self.conv else x.reshape(len(x), -1)
        flat = rows.reshape(-1, rows.shape[-1])
        out = np.empty((len(flat), self.wf.shape[1]), np.float32)
        self.kernels.split_rows(len(flat), max(64, CHUNK_ELEMENTS // self.wf.shape[1]),
                                lambda s, e: np.matmul(flat[s:e], self.wf, out=out[s:e]))
        return out.reshape(rows.shape[:-1] + (self.wf.shape[1],))

    def _quantized(self, z: np.ndarray) -> Planes:
        """This layer's input quantizer on float32 z, packed per pixel / row."""
        enc = self.rec.input
        return self.kernels.code(z, enc.enc, statistic(z, enc), enc.thresholds)

    # what follows the accumulator
    def _affine(self, acc: np.ndarray) -> np.ndarray:
        """z = HT(BN(maxpool(s·A) + b)) in float32, one rounding per operation as numpy's z·α + β."""
        pool = self.rec.pool
        if self.bias is None and pool:  # max-pool the exact accumulator first
            acc = pool_windows(acc, pool).max(axis=(2, 4))
        z = acc if acc.dtype == np.float32 else acc.astype(np.float32)  # acc is this layer's own temporary
        if acc.dtype != np.float32 and self.rec.unit != 1:
            z *= np.float32(self.rec.unit)
        if self.bias is not None:
            z += self.bias
            if pool:
                z = pool_windows(z, pool).max(axis=(2, 4))
        if self.alpha is not None:
            z *= self.alpha
            z += self.beta
        return np.clip(z, -1, 1, out=z) if self.rec.hardtanh else z

    def __call__(self, act: np.ndarray | Planes) -> np.ndarray | Planes:
        """Float activations (NHWC / (N, F)) or packed planes of the previous layer's fold → this layer's
        float output, or the next layer's packed input planes when it is folded (sign threshold or steps)."""
        inp = self.rec.input
        if self.float_in:
            if not inp.is_float:  # quantized input, float weights
                act = dequantize(act.unpacked() if isinstance(act, Planes) else quantize(act, inp), inp.unit)
            acc = self._float_acc(act)
        else:
            op = act if isinstance(act, Planes) else self._quantized(np.asarray(act, np.float32))
            acc = self._int_acc(op)
        if self.steps is not None:
            return self.kernels.steps(acc, *self.steps, self.rec.pool)
        if self.u is None:
            return self._affine(acc)
        return Planes(self.kernels.threshold(acc, self.u, self.g, self.rec.pool), bits=self.out)


class PackedNet:
    """A packed model ready for inference: ``PackedNet.load(path).logits(x)``.

    ``backend``: the kernels' ("numba" where installed, else "numpy"; :data:`~workers.packed.kernels.BACKENDS`);
    ``threads``: threads for the kernels (default: the CPUs available to this process). Batches run
    through the net ``micro_batch`` images at a time (smaller temporaries: less memory, fewer page
    faults). Results depend on neither.
    """

    def __init__(self, header: PackedHeader, arrays: dict, threads: int | None = None,
                 micro_batch: int | None = None, backend: str | None = None):
        self.header = header
        self.micro_batch = micro_batch or MICRO_BATCH
        self.kernels = Kernels(backend, threads or len(os.sched_getaffinity(0)))
        self.layers = [Layer(rec, arrays, self.kernels) for rec in header.layers]

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, micro_batch: int | None = None,
             backend: str | None = None) -> PackedNet:
        return cls(*load_packed(path), threads=threads, micro_batch=micro_batch, backend=backend)

    def close(self) -> None:
        self.kernels.close()

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
        """Float32 (N, classes) outputs for NCHW images ``x`` (numpy or CPU tensor).

        With several threads and images, each thread runs whole micro-batches through the net (one
        hand-over per micro-batch rather than per kernel); a single image splits each kernel instead."""
        x = np.asarray(x, np.float32)
        threads = self.kernels.threads
        step = min(batch_size, self.micro_batch, max(1, -(-len(x) // threads)))
        starts = range(0, len(x), step)
        with _BLAS.limit(limits=1, user_api="blas") if _BLAS else contextlib.nullcontext():
            if threads > 1 and len(starts) > 1:
                parts = self.kernels.map_whole(lambda s: self._forward(x[s: s + step]), starts)
            else:
                parts = [self._forward(x[s: s + step]) for s in starts]
        return np.concatenate(parts)

    def predict(self, x, batch_size: int = 256) -> np.ndarray:
        return self.logits(x, batch_size).argmax(axis=1)

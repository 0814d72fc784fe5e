"""Popcount kernels: integer dot products of bit-plane operands, im2col of packed pixels, folded thresholds.

An operand (activation rows or weight rows) is a sign plane ``n`` (bit 1 ⇔ negative) plus zero
or more non-zero planes ``m_e`` with a shift e: value = (1 − 2n)·Σ_e m_e·2^e (no planes = dense
±1). The planes are disjoint, a value being 0 or ±2^e for one e (every encoding here is; the compiled
GEMM merges the plane pairs of one shift sum on that ground: :func:`workers.packed.jit.shift_groups`).
For one pair of planes with M = m_a & m_w and X = n_a ^ n_w (product negative):

    dot = popcount(M & ~X) − popcount(M & X) = popcount(M) − 2·popcount(M & X)
    dense ±1 (M all ones):  dot = K − 2·popcount(n_a ^ n_w)                       (XNOR)

and the integer accumulator is A = Σ_(e_a, e_w) dot_(e_a, e_w) << (e_a + e_w)  (SHIFT for
powers of two: 3 bits → planes for 1, 2, 4 in units of ¼), in int32. Around it: the input
quantizers' codes packed per pixel (:func:`code_numpy`), im2col of packed pixels
(:func:`gather_numpy`), folded sign thresholds with max-pooling (:func:`threshold_numpy`) and folded
multi-threshold level codes (:func:`steps_numpy`: the next ternary / pow2 input straight from A).

:class:`Kernels` runs them on one of two backends that agree bit for bit: "numba" (compiled,
:mod:`workers.packed.jit`; the default where numba is installed) and "numpy" (the fallback:
``np.bitwise_count`` over broadcast blocks of rows × outputs, rows split over a thread pool).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .format import pack_bits, unpack_bits, words_for

try:
    from . import jit
except ImportError:  # numba is not installed: the numpy kernels do everything
    jit = None

BACKENDS = ("numba", "numpy") if jit is not None else ("numpy",)
CHUNK_ELEMENTS = 65536  # numpy: rows × output channels per chunk and plane pair (buffers stay in L2)
MIN_CHUNK_WORK = 2**18  # compiled kernels: word operations (≈ 0.1 ms) a thread's chunk must hold at least


@dataclass
class Planes:
    """An operand's bit planes: ``neg`` (1 = negative) and ``masks`` [(shift, non-zero plane)], or
    None for dense ±1 (an empty list: all zero).

    ``bits`` None: bool planes, one entry per element (NHWC or (N, F)). ``bits`` = C: packed, the
    last axis is ⌈C/64⌉ uint64 words holding C bits LSB first, zero-padded (per pixel, or per row
    for im2col rows). ``stack``: the (1 + P, ...) array whose slices are ``neg`` and the masks, when
    they were written into one (the compiled kernels take it as is)."""

    neg: np.ndarray
    masks: list[tuple[int, np.ndarray]] | None = None
    bits: int | None = None
    stack: np.ndarray | None = field(default=None, repr=False)

    def map(self, fn) -> Planes:
        """The same operand with ``fn`` applied to every plane (slicing, reshaping)."""
        return Planes(fn(self.neg), None if self.masks is None else [(e, fn(p)) for e, p in self.masks], self.bits)

    def packed(self) -> Planes:
        """Bool planes → packed along the last axis (``pack_bits``)."""
        return Planes(pack_bits(self.neg), None if self.masks is None else [(e, pack_bits(p)) for e, p in self.masks],
                      self.neg.shape[-1])

    def unpacked(self) -> Planes:
        """Packed planes → bool planes (``unpack_bits``)."""
        fn = lambda p: unpack_bits(p, self.bits)  # noqa: E731
        return Planes(fn(self.neg), None if self.masks is None else [(e, fn(p)) for e, p in self.masks])

    def all_zero(self) -> bool:
        return self.masks is not None and not self.masks


@dataclass
class WeightPlanes:
    """A layer's packed weights transposed to (words, out) for the kernels: ``neg``, ``masks`` (views
    into ``stack`` (P, words, out) with ``shifts`` (P,); P = 0 and masks None for dense ±1),
    ``mask_counts`` (popcount of each mask row), K = ``k`` bits, ``out`` outputs."""

    neg: np.ndarray
    masks: list[tuple[int, np.ndarray]] | None
    mask_counts: list[np.ndarray]
    k: int
    out: int
    stack: np.ndarray
    shifts: np.ndarray


def encode_ints(v: np.ndarray, enc: str) -> Planes:
    """Integer levels → bool planes: sign ±1 (dense), ternary {−1, 0, 1}, pow2 {0, ±2^e}."""
    neg = v < 0
    if enc == "sign":
        return Planes(neg)
    mag = np.abs(v)
    exps = sorted({int(e) for e in np.log2(mag[mag > 0])})
    return Planes(neg, [(e, mag == 2**e) for e in exps])


def weight_planes(ints: np.ndarray, enc: str) -> WeightPlanes:
    """(out, K) integer weights → the kernels' transposed packed planes."""
    op = encode_ints(ints, enc)
    t = lambda p: np.ascontiguousarray(pack_bits(p).T)  # noqa: E731
    planes = op.masks or []
    stack = np.stack([t(p) for _, p in planes]) if planes else np.zeros((0, words_for(ints.shape[1]), len(ints)),
                                                                          np.uint64)
    masks = None if op.masks is None else [(e, stack[i]) for i, (e, _) in enumerate(planes)]
    counts = [np.count_nonzero(p, axis=1).astype(np.int32) for _, p in planes]
    return WeightPlanes(t(op.neg), masks, counts, ints.shape[1], ints.shape[0], stack,
                        np.array([e for e, _ in planes], np.int64))


# -- geometry (NHWC) ---------------------------------------------------------------------------
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


# -- numpy kernels -------------------------------------------------------------------------------
def code_numpy(z: np.ndarray, enc: str, stat: np.ndarray | None, thresholds=None) -> Planes:
    """Input levels of float32 z (N, ...) as bool planes, given the per-sample statistic ``stat`` (N,):

    sign: n = signbit(z) (sign(+0) = +1, sign(−0) = −1, as torch's copysign);
    ternary: non-zero ⇔ |z| > Δ (stat = Δ);
    pow2: code j = #{edges t_i ≤ |z|/max|z|} (stat = max|z|), value 2^(j−q) → integer 2^(j−1)
    in units of 2^−(q−1) (code 0 = zero): plane e holds code e + 1.
    """
    neg = np.signbit(z)
    if enc == "sign":
        return Planes(neg)
    stat = stat.reshape((len(z),) + (1,) * (z.ndim - 1))
    a = np.abs(z)
    if enc == "ternary":
        nz = a > stat
        return Planes(neg & nz, [(0, nz)])
    code = np.searchsorted(np.asarray(thresholds, np.float32), a / stat, side="right")
    return Planes(neg & (code > 0), [(e, code == e + 1) for e in range(len(thresholds))])



def accumulate_numpy(a: Planes, w: WeightPlanes, out: np.ndarray) -> None:
    """out[r, o] = Σ_k a[r, k]·w[o, k] (integer units) for packed rows ``a`` (see module doc).

    Per pair of planes and word k: X = n_a ^ n_w (broadcast over rows × outputs), M = m_a & m_w,
    counts += popcount(M & X) (and popcount(M) when both operands have zeros). Popcounts are
    summed in uint8 over groups of 3 words (≤ 192) before going into the uint16/uint32 totals.
    """
    m, words = a.neg.shape
    n = w.out
    cnt_t = np.uint16 if w.k < 2**16 else np.uint32
    shape = (m, n)
    x, t, c = np.empty(shape, np.uint64), np.empty(shape, np.uint64), np.empty(shape, np.uint8)
    dense = [(0, None)]  # masks None = dense ±1; an empty list = all zero (no pairs, A = 0)
    a_list, w_list = dense if a.masks is None else a.masks, dense if w.masks is None else w.masks
    pairs = [(i, j) for i in range(len(a_list)) for j in range(len(w_list))]
    both = {p for p in pairs if a_list[p[0]][1] is not None and w_list[p[1]][1] is not None}
    keys = [(p, "x") for p in pairs] + [(p, "m") for p in both]
    total = {key: np.zeros(shape, cnt_t) for key in keys}
    group = {key: np.empty(shape, np.uint8) for key in keys}

    def count(key, bits, first):
        if first:
            np.bitwise_count(bits, out=group[key])
        else:
            np.add(group[key], np.bitwise_count(bits, out=c), out=group[key])

    for g0 in range(0, words, 3):
        for k in range(g0, min(g0 + 3, words)):
            np.bitwise_xor(a.neg[:, k, None], w.neg[k], out=x)
            for i, j in pairs:
                am, wm = a_list[i][1], w_list[j][1]
                src = x
                if am is None and wm is not None:
                    src = np.bitwise_and(x, wm[k], out=t)
                elif wm is None and am is not None:
                    src = np.bitwise_and(x, am[:, k, None], out=t)
                elif am is not None:
                    count(((i, j), "m"), np.bitwise_and(am[:, k, None], wm[k], out=t), k == g0)
                    src = np.bitwise_and(t, x, out=t)
                count(((i, j), "x"), src, k == g0)
        for key in keys:
            np.add(total[key], group[key], out=total[key])
    out[:] = 0
    for i, j in pairs:
        (sa, am), (sw, wm) = a_list[i], w_list[j]
        if (i, j) in both:
            valid = total[(i, j), "m"].astype(np.int32)
        elif am is not None:
            valid = np.bitwise_count(am).sum(axis=1, dtype=np.int32)[:, None]
        elif wm is not None:
            valid = w.mask_counts[j][None, :]
        else:
            valid = np.int32(w.k)
        term = valid - 2 * total[(i, j), "x"].astype(np.int32)
        out += np.left_shift(term, sa + sw) if sa + sw else term


def gather_numpy(x: np.ndarray, bits: int, kernel, stride, padding) -> np.ndarray:
    """im2col of packed pixels x (N, H, W, ⌈bits/64⌉) → rows (N·OH·OW, ⌈kh·kw·bits/64⌉).

    Whole words (bits % 64 == 0) and whole bytes (bits % 8 == 0) are copied as such; other
    widths go through bools."""
    if bits % 64 == 0:
        words = im2col(x, kernel, stride, padding)
    elif bits % 8 == 0:
        rows = im2col(np.ascontiguousarray(x).view(np.uint8)[..., : bits // 8], kernel, stride, padding)
        pad = -rows.shape[-1] % 8
        rows = np.pad(rows, ((0, 0),) * 3 + ((0, pad),)) if pad else rows
        words = np.ascontiguousarray(rows).view(np.uint64)
    else:
        words = pack_bits(im2col(unpack_bits(x, bits), kernel, stride, padding))
    return words.reshape(-1, words.shape[-1])


def threshold_numpy(acc: np.ndarray, u: np.ndarray, g: np.ndarray, pool: int | None) -> np.ndarray:
    """acc (N, H, W, O) → packed sign words per pixel: negative ⇔ (OR_window(A ≥ U) == g)."""
    hit = acc >= u
    if pool:
        hit = pool_windows(hit, pool).any(axis=(2, 4))
    return pack_bits(hit == g)


def steps_numpy(acc: np.ndarray, t: np.ndarray, g: np.ndarray, pool: int | None) -> Planes:
    """acc (N, H, W, O) → the next input's packed planes from a level fold (``format.Steps``): A max-pooled,
    c = #{i : A ≥ t[i]}, ℓ = c − q or q − c (g), planes: negative ⇔ ℓ < 0, plane e ⇔ |ℓ| = e + 1."""
    if pool:
        acc = pool_windows(acc, pool).max(axis=(2, 4))
    q = len(t) // 2
    count = np.zeros(acc.shape, np.int8)
    for row in t:
        count += acc >= row
    level = np.where(g, q - count, count - q)
    mag = np.abs(level)
    return Planes(level < 0, [(e, mag == e + 1) for e in range(q)]).packed()


# -- the kernels the engine calls ------------------------------------------------------------------
class Kernels:
    """Code, gather, accumulate and threshold on one ``backend`` ("numba" or "numpy"; default the first
    of :data:`BACKENDS`) with ``threads`` threads (a pool that splits rows or images). Results depend
    on neither."""

    def __init__(self, backend: str | None = None, threads: int = 1):
        self.backend = backend or BACKENDS[0]
        if self.backend not in BACKENDS:
            raise ValueError(f"kernel backend {self.backend!r} is not available here; available: {', '.join(BACKENDS)}"
                             + ("" if jit is not None else " (numba is not installed)"))
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._whole = threading.local()  # .active: this thread runs a whole task; its kernels do not split

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown()

    def map_whole(self, fn, items) -> list:
        """[fn(item)] with the items spread over the thread pool; the kernels fn calls run unsplit."""
        def run(item):
            self._whole.active = True
            try:
                return fn(item)
            finally:
                self._whole.active = False

        return list(self._pool.map(run, items)) if self._pool else [fn(item) for item in items]

    def split_rows(self, rows: int, step: int, fn) -> None:
        """fn(start, stop) over row chunks of ``step``, on the thread pool when there is one (and the
        calling thread is not already one of a :meth:`map_whole`'s tasks)."""
        spans = [(s, min(s + step, rows)) for s in range(0, rows, step)]
        if self._pool and len(spans) > 1 and not getattr(self._whole, "active", False):
            list(self._pool.map(lambda sp: fn(*sp), spans))
        else:
            for sp in spans:
                fn(*sp)

    def _split(self, total: int, fn, cost: int) -> None:
        """fn(start, stop) over one chunk of ``total`` items per thread (compiled kernels: no per-chunk
        overhead), fewer chunks when the work (``cost`` ≈ word operations per item) is too small to
        pay for a hand-over between threads."""
        chunks = max(1, min(self.threads, total * cost // MIN_CHUNK_WORK))
        self.split_rows(total, max(1, -(-total // chunks)), fn)

    def code(self, z: np.ndarray, enc: str, stat: np.ndarray | None, thresholds=None) -> Planes:
        """:func:`code_numpy` packed along the last axis (C channels → ⌈C/64⌉ words per pixel / row)."""
        if self.backend == "numpy":
            return code_numpy(z, enc, stat, thresholds).packed()
        z = np.ascontiguousarray(z, np.float32)
        n, c = len(z), z.shape[-1]
        flat = z.reshape(n, -1, c)
        planes = 1 if enc == "sign" else 2 if enc == "ternary" else 1 + len(thresholds)
        out = np.empty((planes, n, flat.shape[1], words_for(c)), np.uint64)
        bits = flat.view(np.uint32)
        if enc == "sign":
            self._split(n, lambda s, e: jit.code_sign(bits, out, s, e), flat[0].size)
        elif enc == "ternary":
            self._split(n, lambda s, e: jit.code_ternary(flat, bits, stat, out, s, e), 2 * flat[0].size)
        else:
            t = np.asarray(thresholds, np.float32)
            self._split(n, lambda s, e: jit.code_pow2(flat, bits, stat, t, out, s, e), planes * flat[0].size)
        out = out.reshape((planes,) + z.shape[:-1] + (words_for(c),))
        masks = None if enc == "sign" else [(e, out[e + 1]) for e in range(planes - 1)]
        return Planes(out[0], masks, c, out)

    def pack(self, op: Planes) -> Planes:
        """Bool planes → packed along the last axis (as :meth:`Planes.packed`)."""
        if self.backend == "numpy":
            return op.packed()
        c = op.neg.shape[-1]

        def pack(p):
            out = np.empty(p.shape[:-1] + (words_for(c),), np.uint64)
            rows, flat = out.reshape(-1, out.shape[-1]), np.ascontiguousarray(p).reshape(-1, c)
            self._split(len(rows), lambda s, e: jit.pack_rows(flat, rows, s, e), c)
            return out

        return Planes(pack(op.neg), None if op.masks is None else [(e, pack(p)) for e, p in op.masks], c)

    def gather(self, op: Planes, kernel, stride, padding) -> Planes:
        """Packed per-pixel planes (N, H, W, words) → packed im2col rows (N·OH·OW, row words)."""
        if self.backend == "numpy":
            rows = op.map(lambda p: gather_numpy(p, op.bits, kernel, stride, padding))
            rows.bits = kernel[0] * kernel[1] * op.bits
            return rows
        n, h, w, _ = op.neg.shape
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        rows = n * ((h + 2 * ph - kh) // sh + 1) * ((w + 2 * pw - kw) // sw + 1)
        planes = [np.ascontiguousarray(p) for p in [op.neg] + [p for _, p in op.masks or []]]
        stack = np.empty((len(planes), rows, words_for(kh * kw * op.bits)), np.uint64)

        def run(s, e):
            for p, out in zip(planes, stack, strict=True):
                jit.gather(p, op.bits, kh, kw, sh, sw, ph, pw, out, s, e)

        self._split(n, run, len(planes) * stack.shape[1] * stack.shape[2] // max(n, 1))
        masks = None if op.masks is None else [(e, stack[i + 1]) for i, (e, _) in enumerate(op.masks)]
        return Planes(stack[0], masks, kh * kw * op.bits, stack)

    def accumulate(self, a: Planes, w: WeightPlanes, corr: np.ndarray | None = None) -> np.ndarray:
        """(rows, out) int32 accumulators of packed rows ``a`` against ``w``, minus ``corr[r % P]``
        when a correction (P, out) is given."""
        out = np.empty((len(a.neg), w.out), np.int32)
        if a.all_zero() or (w.masks is not None and not w.masks):
            out[:] = 0
            if corr is not None:
                out.reshape(-1, len(corr), w.out)[:] -= corr
        elif self.backend == "numpy":
            pairs = max(1, len(a.masks or [0]) * len(w.masks or [0]))
            self.split_rows(len(out), max(8, CHUNK_ELEMENTS // (w.out * pairs)),
                            lambda s, e: accumulate_numpy(a.map(lambda p: p[s:e]), w, out[s:e]))
            if corr is not None:
                out.reshape(-1, len(corr), w.out)[:] -= corr
        else:
            neg = np.ascontiguousarray(a.neg)
            corr = np.zeros((1, w.out), np.int32) if corr is None else np.ascontiguousarray(corr, np.int32)
            if a.masks is None and w.masks is None:
                self._split(len(out), lambda s, e: jit.xnor_gemm(neg, w.neg, w.k, corr, out, s, e), w.neg.size)
            else:
                if a.masks is None:
                    am = np.zeros((0,) + neg.shape, np.uint64)
                else:
                    am = a.stack[1:] if a.stack is not None else np.stack([p for _, p in a.masks])
                sa = np.array([e for e, _ in a.masks or []], np.int64)
                pairs = max(1, len(am)) * max(1, len(w.stack))
                self._split(len(out), lambda s, e: jit.planes_gemm(neg, am, sa, w.neg, w.stack, w.shifts, w.k, corr,
                                                                   out, s, e), pairs * w.neg.size)
        return out

    def threshold(self, acc: np.ndarray, u: np.ndarray, g: np.ndarray, pool: int | None) -> np.ndarray:
        """Folded sign threshold of acc (N, H, W, O) (or (N, O)) → packed sign words per pixel."""
        spatial = acc.ndim == 4
        acc4 = acc if spatial else acc[:, None, None, :]
        if self.backend == "numpy":
            out = threshold_numpy(acc4, u, g, pool)
        else:
            k = pool or 1
            n, h, w, o = acc4.shape
            out = np.empty((n, h // k, w // k, words_for(o)), np.uint64)
            acc4 = np.ascontiguousarray(acc4)
            self._split(n, lambda s, e: jit.threshold(acc4, u, g, k, out, s, e), h * w * o)
        return out if spatial else out[:, 0, 0]


    def steps(self, acc: np.ndarray, t: np.ndarray, g: np.ndarray, pool: int | None) -> Planes:
        """Level fold of acc (N, H, W, O) (or (N, O)) → the next layer's packed input planes (``steps_numpy``)."""
        spatial = acc.ndim == 4
        acc4 = acc if spatial else acc[:, None, None, :]
        if self.backend == "numpy":
            op = steps_numpy(acc4, t, g, pool)
        else:
            k, q = pool or 1, len(t) // 2
            n, h, w, o = acc4.shape
            stack = np.empty((1 + q, n, h // k, w // k, words_for(o)), np.uint64)
            acc4 = np.ascontiguousarray(acc4)
            self._split(n, lambda s, e: jit.steps(acc4, t, g, k, stack, s, e), h * w * o * (1 + len(t)))
            op = Planes(stack[0], [(e, stack[e + 1]) for e in range(q)], o, stack)
        return op if spatial else op.map(lambda p: p[:, 0, 0])


def popcount_matmul(a: np.ndarray, w: np.ndarray, a_enc: str, w_enc: str, backend: str | None = None) -> np.ndarray:
    """a (M, K) @ w (N, K)ᵀ on integer levels, computed with XNOR / AND + popcount + shifts."""
    kernels = Kernels(backend)
    try:
        return kernels.accumulate(kernels.pack(encode_ints(a, a_enc)), weight_planes(w, w_enc))
    finally:
        kernels.close()

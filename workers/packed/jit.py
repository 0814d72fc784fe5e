"""The popcount kernels compiled with numba (LLVM): the engine's fast path.

Why numba: it installs from PyPI wheels (llvmlite bundles LLVM; no compiler toolchain at install
or run time) and compiles these loops for the CPU it runs on: ``popcount`` becomes ``popcnt``, or
AVX-512 ``vpopcntq`` where the loop over outputs vectorises. Compiled code is cached next to this
file (``cache=True``; numba falls back to a user cache directory where that is read-only), so only
the first run on a machine pays the compile (``bench/packed.py`` states it).

Every kernel works on a range [start, stop) of rows or images of whole arrays and releases the GIL
(``nogil``): :class:`workers.packed.kernels.Kernels` splits the range over its own thread pool
(threads that sleep when idle, unlike an OpenMP pool, which spins: on a machine shared with
other jobs — or with torch's own OpenMP pool in the same process — spinning threads starve).

Same arithmetic as the numpy kernels in :mod:`workers.packed.kernels`, bit for bit:

  xnor_gemm   dense ±1 × dense ±1:  A = K − 2·Σ_k popcount(a_k ^ w_k)
  planes_gemm any planes:  A = Σ_s (popcount(U_s) − 2·popcount(U_s & (n_a ^ n_w))) << s,
              U_s = OR_(e_i + e_j = s) m_a,i & m_w,j (each side's planes are disjoint); a dense side's
              mask is all ones over the K valid bits
  gather      per-pixel packed words (N, H, W, ⌈C/64⌉) → im2col rows of kh·kw·C bits, tap-major,
              packed tightly as the weights are (zero bits for padded taps)
  threshold   int32 accumulators → per-pixel packed sign bits: negative ⇔ (OR_window(A ≥ U) == g)
  steps       int32 accumulators → the next ternary / pow2 input's packed planes from a level fold:
              c = #{i : max_window(A) ≥ t_i}, ℓ = ±(c − q): negative plane ⇔ ℓ < 0, plane e ⇔ |ℓ| = e + 1
  pack_rows   bool rows → packed words (``format.pack_bits``)
  code_*      the input quantizers' levels of float32 activations, packed per pixel (sign, ternary,
              powers of two; the per-sample statistic comes from the engine)

The GEMMs subtract a correction ``corr[r % P, o]`` (the engine's zero-padding correction of a
dense ±1 conv input, one row per output position; a single zero row otherwise).
"""
from __future__ import annotations

import functools
import threading

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
ROW_BLOCK = 4  # rows sharing each loaded weight vector in xnor_gemm
jit = njit(cache=True, nogil=True, boundscheck=False)


@intrinsic
def popcount(typingctx, x):
    """Population count of a uint64 (LLVM ``ctpop``)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@jit
def xnor_gemm(a, wt, k_bits, corr, out, r0, r1):
    """out[r, o] = K − 2·Σ_k popcount(a[r, k] ^ wt[k, o]) − corr[r % P, o] for rows r0 ≤ r < r1 of dense
    ±1 rows a (R, W), transposed weights wt (W, O) (padding bits zero on both sides), corr (P, O)."""
    words, n_out = wt.shape
    period = corr.shape[0]
    acc = np.zeros((ROW_BLOCK, n_out), np.int64)
    for b0 in range(r0, r1, ROW_BLOCK):
        acc[:] = 0
        if b0 + ROW_BLOCK <= r1:
            for k in range(words):
                a0, a1, a2, a3 = a[b0, k], a[b0 + 1, k], a[b0 + 2, k], a[b0 + 3, k]
                for o in range(n_out):
                    w = wt[k, o]
                    acc[0, o] += popcount(a0 ^ w)
                    acc[1, o] += popcount(a1 ^ w)
                    acc[2, o] += popcount(a2 ^ w)
                    acc[3, o] += popcount(a3 ^ w)
        else:
            for i in range(r1 - b0):
                for k in range(words):
                    ai = a[b0 + i, k]
                    for o in range(n_out):
                        acc[i, o] += popcount(ai ^ wt[k, o])
        for i in range(min(ROW_BLOCK, r1 - b0)):
            c = (b0 + i) % period
            for o in range(n_out):
                out[b0 + i, o] = k_bits - 2 * acc[i, o] - corr[c, o]


@functools.cache  # called per GEMM call with the same few shift tuples
def shift_groups(sa: tuple, sw: tuple) -> tuple:
    """The plane pairs (i, j) grouped by their shift sa_i + sw_j: (shifts, pair_i, pair_j, starts), group g
    holding pairs starts[g] ≤ p < starts[g + 1]; a side without planes (dense ±1) counts as one plane of shift 0."""
    pairs = sorted((int(a) + int(w), i, j) for i, a in enumerate(sa or [0]) for j, w in enumerate(sw or [0]))
    shifts = tuple(sorted({s for s, _, _ in pairs}))
    starts = tuple(next(p for p, pair in enumerate(pairs) if pair[0] == s) for s in shifts) + (len(pairs),)
    return shifts, tuple(i for _, i, _ in pairs), tuple(j for _, _, j in pairs), starts


def _planes_gemm(pa: int, pw: int, groups: tuple):
    """The kernel for ``pa`` activation and ``pw`` weight mask planes (0 = that side is dense ±1) with the
    pairs' shift ``groups`` (:func:`shift_groups`), compiled once per such key: with them constant, the
    plane loops unroll inside the vectorised loop over outputs.

    Each operand's planes are disjoint (a value is 0 or ±2^e for one e), so at each bit at most one pair
    of a group is non-zero: the group's masks OR into one, U_s = OR_(sa_i + sw_j = s) m_a,i & m_w,j, and
    A = Σ_s (popcount(U_s) − 2·popcount(U_s & X)) << s takes two popcounts per shift, not per pair
    (W3A3: 10 popcounts for 9 pairs, not 18)."""
    shifts, pair_i, pair_j, starts = groups

    @jit
    def planes_gemm(an, am, wn, wm, k_bits, corr, out, r0, r1):
        words, n_out = wn.shape
        period = corr.shape[0]
        tail = ALL if k_bits % 64 == 0 else (np.uint64(1) << np.uint64(k_bits % 64)) - np.uint64(1)
        acc = np.zeros(n_out, np.int64)
        for r in range(r0, r1):
            acc[:] = 0
            for k in range(words):
                full = ALL if k < words - 1 else tail
                x = an[r, k]
                for o in range(n_out):
                    xo = x ^ wn[k, o]
                    t = np.int64(0)
                    for g in range(len(shifts)):
                        u = np.uint64(0)
                        for p in range(starts[g], starts[g + 1]):
                            m = full if pa == 0 else am[pair_i[p], r, k]
                            u |= m if pw == 0 else m & wm[pair_j[p], k, o]
                        t += (np.int64(popcount(u)) - 2 * np.int64(popcount(u & xo))) << shifts[g]
                    acc[o] += t
            c = r % period
            for o in range(n_out):
                out[r, o] = acc[o] - corr[c, o]

    return planes_gemm


_PLANES: dict[tuple, object] = {}
_PLANES_LOCK = threading.Lock()


def planes_gemm(an, am, sa, wn, wm, sw, k_bits, corr, out, r0, r1):
    """out[r] (r0 ≤ r < r1) = Σ over plane pairs of (popcount(M) − 2·popcount(M & X)) << (sa_i + sw_j) − corr[r % P].

    an (R, W) sign words, am (Pa, R, W) mask planes with shifts sa (Pa = 0: dense ±1 rows);
    wn (W, O), wm (Pw, W, O), sw likewise for the transposed weights; K = k_bits valid bits. The planes
    of each side are disjoint (see :func:`_planes_gemm`)."""
    key = (am.shape[0], wm.shape[0], shift_groups(tuple(sa), tuple(sw)))
    with _PLANES_LOCK:
        if key not in _PLANES:
            _PLANES[key] = _planes_gemm(*key)
    _PLANES[key](an, am, wn, wm, k_bits, corr, out, r0, r1)


@jit
def gather(x, c, kh, kw, sh, sw, ph, pw, out, n0, n1):
    """im2col on packed pixels of images n0 ≤ b < n1: x (N, H, W, ⌈c/64⌉) → out (N·OH·OW, ⌈kh·kw·c/64⌉),
    row bits tap-major (kh, kw, c), each tap's c bits appended right after the previous tap's."""
    _, h, w, wc = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    row_words = out.shape[1]
    for b in range(n0, n1):
        for oy in range(oh):
            for ox in range(ow):
                row = out[(b * oh + oy) * ow + ox]
                for q in range(row_words):
                    row[q] = 0
                pos = 0
                for dy in range(kh):
                    y = oy * sh - ph + dy
                    for dx in range(kw):
                        xx = ox * sw - pw + dx
                        if 0 <= y < h and 0 <= xx < w:
                            if pos % 64 == 0 and c % 64 == 0:
                                for q in range(wc):
                                    row[pos // 64 + q] = x[b, y, xx, q]
                            else:
                                p = pos
                                for q in range(wc):
                                    v = x[b, y, xx, q]
                                    nb = min(64, c - 64 * q)
                                    off = p % 64
                                    row[p // 64] |= v << np.uint64(off)
                                    if off and off + nb > 64:
                                        row[p // 64 + 1] |= v >> np.uint64(64 - off)
                                    p += nb
                        pos += c


@njit(cache=True, nogil=True, boundscheck=False, inline="always")  # inlined: as fast as the loops written out
def window_max(acc, b, py, px, k, top):
    """top[o] = max over the k×k window (py, px) of image b of acc[..., o] (vectorised over the channels)."""
    top[:] = acc[b, py * k, px * k]
    for dy in range(k):
        for dx in range(k):
            for o in range(top.shape[0]):
                top[o] = max(top[o], acc[b, py * k + dy, px * k + dx, o])


@jit
def threshold(acc, u, g, k, out, n0, n1):
    """acc (N, H, W, O) int32 → out (N, H//k, W//k, ⌈O/64⌉) sign words for images n0 ≤ b < n1: bit o
    set (negative) ⇔ (max over the k×k window of acc[..., o] ≥ u[o]) == g[o]; k = 1 is no pooling."""
    n_out = acc.shape[3]
    ph, pw = acc.shape[1] // k, acc.shape[2] // k
    top = np.empty(n_out, np.int32)
    neg = np.empty(n_out, np.uint64)
    for b in range(n0, n1):
        for py in range(ph):
            for px in range(pw):
                window_max(acc, b, py, px, k, top)
                for o in range(n_out):
                    neg[o] = np.uint64((top[o] >= u[o]) == g[o])
                for q in range(out.shape[3]):
                    word = np.uint64(0)
                    for j in range(min(64, n_out - 64 * q)):
                        word |= neg[64 * q + j] << np.uint64(j)
                    out[b, py, px, q] = word


@jit
def steps(acc, t, g, k, out, n0, n1):
    """acc (N, H, W, O) int32 → out (1 + q, N, H//k, W//k, ⌈O/64⌉) planes of the next input for images
    n0 ≤ b < n1, from a level fold t (2q, O), g (O,): A = max over the k×k window, c = #{i : A ≥ t[i]},
    ℓ = c − q (q − c where g); out[0] bit ⇔ ℓ < 0, out[1 + e] bit ⇔ |ℓ| = e + 1."""
    n_out = acc.shape[3]
    ph, pw = acc.shape[1] // k, acc.shape[2] // k
    q = t.shape[0] // 2
    top = np.empty(n_out, np.int32)
    level = np.empty(n_out, np.int32)
    neg = np.empty(n_out, np.uint64)
    sgn = np.where(g, -1, 1).astype(np.int32)
    for b in range(n0, n1):
        for py in range(ph):
            for px in range(pw):
                window_max(acc, b, py, px, k, top)
                level[:] = -q
                for i in range(2 * q):
                    for o in range(n_out):
                        level[o] += top[o] >= t[i, o]
                for o in range(n_out):
                    level[o] *= sgn[o]
                    neg[o] = np.uint64(level[o] < 0)
                    level[o] = abs(level[o])
                for qw in range(out.shape[4]):
                    base, nb = 64 * qw, min(64, n_out - 64 * qw)
                    word = np.uint64(0)
                    for j in range(nb):  # OR reductions, no branches (random levels would mispredict)
                        word |= neg[base + j] << np.uint64(j)
                    out[0, b, py, px, qw] = word
                    for e in range(1, q + 1):
                        word = np.uint64(0)
                        for j in range(nb):
                            word |= np.uint64(level[base + j] == e) << np.uint64(j)
                        out[e, b, py, px, qw] = word


@jit
def pack_rows(bits, out, r0, r1):
    """bool (R, C) → uint64 (R, ⌈C/64⌉) for rows r0 ≤ r < r1: bit c at word c // 64, bit c % 64, zero-padded."""
    c = bits.shape[1]
    for r in range(r0, r1):
        for q in range(out.shape[1]):
            word = np.uint64(0)
            for j in range(min(64, c - 64 * q)):
                word |= np.uint64(bits[r, 64 * q + j]) << np.uint64(j)
            out[r, q] = word


@jit
def code_sign(zbits, out, n0, n1):
    """Sign plane of float32 z (N, L, C), given as its uint32 bits: out (1, N, L, ⌈C/64⌉), bit ⇔ signbit(z)."""
    pixels, c = zbits.shape[1], zbits.shape[2]
    for b in range(n0, n1):
        for p in range(pixels):
            for q in range(out.shape[3]):
                word = np.uint64(0)
                for j in range(min(64, c - 64 * q)):
                    word |= np.uint64(zbits[b, p, 64 * q + j] >> np.uint32(31)) << np.uint64(j)
                out[0, b, p, q] = word


@jit
def code_ternary(z, zbits, delta, out, n0, n1):
    """Ternary planes of z (N, L, C) with per-sample Δ (N,): out[1] non-zero ⇔ |z| > Δ, out[0] negative
    ⇔ signbit(z) and non-zero; out (2, N, L, ⌈C/64⌉)."""
    pixels, c = z.shape[1], z.shape[2]
    for b in range(n0, n1):
        for p in range(pixels):
            for q in range(out.shape[3]):
                neg, nz = np.uint64(0), np.uint64(0)
                for j in range(min(64, c - 64 * q)):
                    k = 64 * q + j
                    m = np.uint64(abs(z[b, p, k]) > delta[b])
                    nz |= m << np.uint64(j)
                    neg |= (m & np.uint64(zbits[b, p, k] >> np.uint32(31))) << np.uint64(j)
                out[0, b, p, q], out[1, b, p, q] = neg, nz


@jit
def code_pow2(z, zbits, top, thresholds, out, n0, n1):
    """Powers-of-two planes of z (N, L, C) with per-sample max|z| ``top`` (N,): code j = #{t ≤ |z|/top};
    out[1 + e] ⇔ code = e + 1, out[0] ⇔ signbit(z) and code > 0; out (1 + T, N, L, ⌈C/64⌉)."""
    pixels, c = z.shape[1], z.shape[2]
    levels = thresholds.shape[0]
    for b in range(n0, n1):
        for p in range(pixels):
            for q in range(out.shape[3]):
                for e in range(levels + 1):
                    out[e, b, p, q] = 0
                for j in range(min(64, c - 64 * q)):
                    k = 64 * q + j
                    r = abs(z[b, p, k]) / top[b]
                    code = 0
                    for t in range(levels):
                        code += thresholds[t] <= r
                    bit = np.uint64(1) << np.uint64(j)
                    if code:
                        out[code, b, p, q] |= bit
                        out[0, b, p, q] |= bit * np.uint64(zbits[b, p, k] >> np.uint32(31))

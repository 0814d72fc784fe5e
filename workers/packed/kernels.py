"""Popcount kernels: integer dot products of bit-plane operands (numpy).

An operand (activation rows or weight rows) is a sign plane ``n`` (bit 1 ⇔ negative) plus zero
or more non-zero planes ``m_e`` with a shift e: value = (1 − 2n)·Σ_e m_e·2^e (no planes = dense
±1). For one pair of planes with M = m_a & m_w and X = n_a ^ n_w (product negative):

    dot = popcount(M & ~X) − popcount(M & X) = popcount(M) − 2·popcount(M & X)
    dense ±1 (M all ones):  dot = K − 2·popcount(n_a ^ n_w)                       (XNOR)

and the integer accumulator is A = Σ_(e_a, e_w) dot_(e_a, e_w) << (e_a + e_w)  (SHIFT for
powers of two: 3 bits → planes for 1, 2, 4 in units of ¼). Counts go into uint16/uint32 and A
into int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .format import pack_bits


@dataclass
class Planes:
    """An operand's bit planes: ``neg`` (1 = negative) and ``masks`` [(shift, non-zero plane)], or
    None for dense ±1 (an empty list: all zero). The same shape holds bool planes (one entry per
    element, NHWC or (N, F)) and packed rows (uint64 words, (rows, W))."""

    neg: np.ndarray
    masks: list[tuple[int, np.ndarray]] | None = None

    def map(self, fn) -> Planes:
        """The same operand with ``fn`` applied to every plane (packing, slicing, im2col)."""
        return Planes(fn(self.neg), None if self.masks is None else [(e, fn(p)) for e, p in self.masks])


@dataclass
class WeightPlanes:
    """A layer's packed weights, transposed to (words, out) for the kernel, and their integers."""

    neg: np.ndarray
    masks: list[tuple[int, np.ndarray]] | None
    mask_counts: list[np.ndarray]
    k: int
    out: int


def encode_ints(v: np.ndarray, enc: str) -> Planes:
    """Integer levels → bool planes: sign ±1 (dense), ternary {−1, 0, 1}, pow2 {0, ±2^e}."""
    neg = v < 0
    if enc == "sign":
        return Planes(neg)
    mag = np.abs(v)
    exps = sorted({int(e) for e in np.log2(mag[mag > 0])})
    return Planes(neg, [(e, mag == 2**e) for e in exps])


def weight_planes(ints: np.ndarray, enc: str) -> WeightPlanes:
    """(out, K) integer weights → the kernel's transposed packed planes."""
    op = encode_ints(ints, enc)
    packed = op.map(lambda p: np.ascontiguousarray(pack_bits(p).T))
    counts = [np.count_nonzero(p, axis=1).astype(np.int32) for _, p in op.masks or []]
    return WeightPlanes(packed.neg, packed.masks, counts, ints.shape[1], ints.shape[0])


def accumulate(a: Planes, w: WeightPlanes, out: np.ndarray) -> None:
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


def popcount_matmul(a: np.ndarray, w: np.ndarray, a_enc: str, w_enc: str) -> np.ndarray:
    """a (M, K) @ w (N, K)ᵀ on integer levels, computed with XNOR / AND + popcount + shifts."""
    out = np.empty((len(a), len(w)), np.int32)
    accumulate(encode_ints(a, a_enc).map(pack_bits), weight_planes(w, w_enc), out)
    return out

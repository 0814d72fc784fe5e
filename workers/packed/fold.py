"""Folding what follows a quantized layer's integer accumulator (export side, torch).

A block is  acc → [+bias] → [MaxPool] → [BN] → [HardTanh] → next layer's input quantizer.
The layer's output is y = s·A with A the integer accumulator and s the power-of-two unit of
the level products (1 for ±1/ternary operands, 2^−(q−1) per powers-of-two operand).

Exact fold (next quantizer is sign, 1 bit): sign(HT(z)) = sign(z) and BN(y) = α·y + β is
monotone per channel, so ``sign(HT(BN(s·A + b))) = +1  ⇔  (A ≥ U) XOR g`` with an integer U per
channel and g = 1 where α < 0 (there ``+1 ⇔ A ≤ U − 1``); α = 0 gives a constant. MaxPool
before BN commutes with the threshold: ``+1 after max-pool ⇔ OR_window(A ≥ U) XOR g`` (γ > 0:
max ≥ t ⇔ any ≥ t; γ < 0: max ≤ t' ⇔ all ≤ t' ⇔ NOT any(A ≥ t'+1)).

Exact fold (next quantizer ternary or powers of two with a constant statistic, ``act_stats=running``):
Δ and max|x| are fixed numbers, so the next layer's signed level index ℓ ∈ {−q, …, q} (ternary q = 1:
ℓ = output; pow2 with q magnitudes: output = sign(ℓ)·2^(|ℓ|−q)) is a monotone step function of A per
channel (every float32 operation on the way is monotone: non-decreasing where α > 0, non-increasing where
α < 0, constant where α = 0). With c(A) = #{i : A ≥ T_i} over 2q integer thresholds T_1 ≤ … ≤ T_2q:
``ℓ = c − q`` (g = 0) or ``ℓ = q − c`` (g = 1). Levels HardTanh makes unreachable get T = ``BIG``, two
levels switched at the same A get equal thresholds. Max-pool sits before BN, on y = s·A + b, which rises
with A: the pooled code is the code of max_window(A) for either sign of α (α < 0: the minimum of the
window's codes).

Thresholds are not computed from a formula but found by running the model's own torch modules (bias add,
BN, HardTanh, quantizer) on integer candidates (sign: around τ = μ − β·σ/γ; levels: a bisection per level
and channel): the fold reproduces torch's float32 eval arithmetic, rounding, HardTanh saturation, the strict
``|x| > Δ`` and ``bucketize(right=True)`` edges included. Accumulator ranges up to :data:`FULL_RANGE` wide
are searched exhaustively (which also checks monotonicity).

Not folded (kept as float32 α, β and applied at run time): a next quantizer with per-sample
statistics (ternary Δ = 0.7·mean|x|, powers of two max|x|), float accumulators (float input),
and the last layer (float logits).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

BIG = 2**30  # threshold of a constant channel, beyond any accumulator
FULL_RANGE = 4096  # evaluate every candidate when the accumulator range is at most this wide
WINDOW = 16


def bn_affine(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Eval-mode BN as z = y·α + β in float32, computed as torch's CPU kernel does:
    α = γ / √(var + ε), β = b − μ·α (γ = 1, b = 0 without affine parameters)."""
    f32 = np.float32
    var, mean = (bn.running_var.detach().cpu().numpy().astype(f32), bn.running_mean.detach().cpu().numpy().astype(f32))
    c = var.shape[0]
    gamma = bn.weight.detach().cpu().numpy().astype(f32) if bn.weight is not None else np.ones(c, f32)
    bias = bn.bias.detach().cpu().numpy().astype(f32) if bn.bias is not None else np.zeros(c, f32)
    invstd = f32(1) / np.sqrt(var + f32(bn.eps))
    alpha = invstd * gamma
    return alpha, bias - mean * alpha


def _switch_estimate(bn: nn.Module | None, bias: torch.Tensor | None, c: int, unit: float) -> np.ndarray:
    """τ/s: where BN(s·A + b) crosses 0, in accumulator units (float64; ±inf when α = 0)."""
    b = bias.detach().double().cpu().numpy() if bias is not None else np.zeros(c)
    if bn is None:
        return -b / unit
    alpha, beta = (a.astype(np.float64) for a in bn_affine(bn))
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = -beta / alpha - b
    return np.where(alpha == 0, np.where(beta >= 0, -np.inf, np.inf), tau) / unit


@torch.no_grad()
def _torch_output(cand: np.ndarray, unit: float, spatial: bool, bias, bn, hardtanh, quantizer) -> np.ndarray:
    """Torch's eval output quantizer(HT(BN(s·A + b))) for accumulators ``cand`` (n, C), float32 (n, C).

    The modules must be on the CPU and in eval mode (export works on a CPU copy of the model)."""
    y = torch.from_numpy(cand.astype(np.float32) * np.float32(unit))
    if spatial:
        y = y[:, :, None, None]
    if bias is not None:
        y = y + bias.detach().float().view(1, -1, *([1, 1] if spatial else []))
    for m in (bn, hardtanh):
        if m is not None:
            y = m(y)
    q = quantizer(y)
    return q.reshape(q.shape[0], q.shape[1]).numpy()


def _torch_positive(cand: np.ndarray, unit: float, spatial: bool, bias, bn, hardtanh, quantizer) -> np.ndarray:
    """Torch's eval output > 0 for accumulators ``cand`` (n, C)."""
    return _torch_output(cand, unit, spatial, bias, bn, hardtanh, quantizer) > 0


def sign_threshold(*, a_max: int, unit: float, spatial: bool, channels: int, bias=None, bn=None, hardtanh=None,
                   quantizer) -> tuple[np.ndarray, np.ndarray]:
    """Fold [bias] → BN → [HT] → sign quantizer into (U int32, g bool) per channel, exactly.

    ``a_max`` bounds |A|. Candidates: every integer in [−a_max, a_max] when that range is at
    most :data:`FULL_RANGE` wide, else a window of ±16 around τ/s clipped to the range.
    """
    if 2 * a_max + 1 <= FULL_RANGE:
        base = np.full(channels, -a_max, np.int64)
        n = 2 * a_max + 1
    else:
        tau = _switch_estimate(bn, bias, channels, unit)
        centre = np.clip(np.nan_to_num(tau, posinf=a_max + WINDOW, neginf=-a_max - WINDOW), -a_max - WINDOW,
                         a_max + WINDOW)
        base = np.floor(centre).astype(np.int64) - WINDOW
        n = 2 * WINDOW + 1
    cand = base[None, :] + np.arange(n)[:, None]  # (n, C)
    pos = _torch_positive(cand, unit, spatial, bias, bn, hardtanh, quantizer)
    flips = np.diff(pos.astype(np.int8), axis=0)
    if (np.abs(flips).sum(axis=0) > 1).any():
        raise ValueError("BN → sign is not monotone in the accumulator; cannot fold")
    up, down = (flips == 1).any(axis=0), (flips == -1).any(axis=0)
    first_pos = np.argmax(pos, axis=0)  # rising channels: first positive candidate
    first_neg = np.argmax(~pos, axis=0)  # falling channels: first negative candidate
    const_pos = pos.all(axis=0)
    u = np.where(up, cand[first_pos, np.arange(channels)],
                 np.where(down, cand[first_neg, np.arange(channels)], np.where(const_pos, -BIG, BIG)))
    if 2 * a_max + 1 > FULL_RANGE:  # a window without a switch must lie beyond the reachable range
        inside = ~(up | down) & (np.abs(base + WINDOW) <= a_max)
        if inside.any():
            raise ValueError(f"threshold search window missed the switch in channels {np.flatnonzero(inside)[:8]}")
    # falling (α < 0): +1 ⇔ A < first negative ⇔ NOT (A ≥ U); constant: +1 ⇔ (A ≥ −BIG)
    return u.astype(np.int32), down


def level_index(out: np.ndarray, levels: int) -> np.ndarray:
    """Quantizer outputs {0, ±2^(j−q)} (ternary: q = 1, {0, ±1}) → signed level indices ±j (int64)."""
    mag = np.abs(out)
    j = np.where(mag > 0, np.log2(np.where(mag > 0, mag, 1)) + levels, 0)
    if (j != np.round(j)).any() or (j < 0).any() or (j > levels).any():
        raise ValueError(f"quantizer outputs off the {levels}-magnitude power-of-two levels")
    return (np.sign(out) * j).astype(np.int64)


def level_thresholds(*, a_max: int, unit: float, spatial: bool, channels: int, levels: int, bias=None, bn=None,
                     hardtanh=None, quantizer) -> tuple[np.ndarray, np.ndarray]:
    """Fold [bias] → BN → [HT] → a constant-statistic ternary / powers-of-two quantizer with ``levels`` = q
    magnitudes into (T int32 (2q, C), g bool (C,)), exactly: the level index is ℓ = c − q (g = 0) or q − c
    (g = 1) with c = #{i : A ≥ T[i, channel]}.

    ``a_max`` bounds |A|. Every integer in [−a_max, a_max] is evaluated when that range is at most
    :data:`FULL_RANGE` wide (and monotonicity checked), else each threshold is bisected on torch's output.
    """
    q = levels
    run = lambda cand: level_index(  # noqa: E731
        _torch_output(cand, unit, spatial, bias, bn, hardtanh, quantizer), q)
    ends = run(np.array([[-a_max], [a_max]]).repeat(channels, axis=1))
    g = ends[1] < ends[0]
    sgn = np.where(g, -1, 1)  # sgn·ℓ rises with A
    goal = np.arange(1, 2 * q + 1)[:, None] - q  # (2q, 1): levels −q+1 … q of sgn·ℓ
    if 2 * a_max + 1 <= FULL_RANGE:
        cand = np.arange(-a_max, a_max + 1)
        lv = run(cand[:, None].repeat(channels, axis=1)) * sgn  # (n, C)
        if (np.diff(lv, axis=0) < 0).any():
            raise ValueError("BN → quantizer is not monotone in the accumulator; cannot fold")
        reach = lv[None, :, :] >= goal[:, :, None]  # (2q, n, C)
        t = np.where(reach.any(axis=1), cand[np.argmax(reach, axis=1)], BIG)
    else:  # bisection: lo never reaches the level, hi does (hi = a_max where a_max itself does not: BIG below)
        lo = np.full((2 * q, channels), -a_max - 1, np.int64)
        hi = np.full((2 * q, channels), a_max, np.int64)
        while (hi - lo > 1).any():
            mid = (lo + hi) // 2
            ok = run(mid) * sgn >= goal
            hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
        t = np.where((ends * sgn).max(axis=0) >= goal, hi, BIG)
    t = np.where(t <= -a_max, -BIG, t)  # reached by every accumulator
    return t.astype(np.int32), g

"""Folding what follows a quantized layer's integer accumulator (export side, torch).

A block is  acc → [+bias] → [MaxPool] → [BN] → [HardTanh] → next layer's input quantizer.
The layer's output is y = s·A with A the integer accumulator and s the power-of-two unit of
the level products (1 for ±1/ternary operands, 2^−(q−1) per powers-of-two operand).

Exact fold (next quantizer is sign, 1 bit): sign(HT(z)) = sign(z) and BN(y) = α·y + β is
monotone per channel, so ``sign(HT(BN(s·A + b))) = +1  ⇔  (A ≥ U) XOR g`` with an integer U per
channel and g = 1 where α < 0 (there ``+1 ⇔ A ≤ U − 1``); α = 0 gives a constant. MaxPool
before BN commutes with the threshold: ``+1 after max-pool ⇔ OR_window(A ≥ U) XOR g`` (γ > 0:
max ≥ t ⇔ any ≥ t; γ < 0: max ≤ t' ⇔ all ≤ t' ⇔ NOT any(A ≥ t'+1)).

U is not computed from a formula but found by running the model's own torch modules (bias add,
BN, HardTanh, quantizer) on integer candidates around τ = μ − β·σ/γ: the fold reproduces
torch's float32 eval arithmetic, rounding included.

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
def _torch_positive(cand: np.ndarray, unit: float, spatial: bool, bias, bn, hardtanh, quantizer) -> np.ndarray:
    """Torch's eval output > 0 for accumulators ``cand`` (n, C): quantizer(HT(BN(s·A + b))) > 0.

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
    return (q.reshape(q.shape[0], q.shape[1]) > 0).numpy()


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

"""Hard quantizers: functions that map a tensor onto a finite set of levels.

A quantizer only says *which level* each value lands on; what the forward pass uses while
training and what gradient flows back is the business of an estimator (``estimators.base``).
Every quantizer here is registered by name, has a ``levels(bits)`` set that its output always
lies in (up to a per-tensor or per-channel scale where noted), and is pure torch.

Statistics (ternary's mean|x|, powers-of-two's max|x|) are taken over ``dims``: ``None`` means the
whole tensor (weights; activations per batch), ``"sample"`` means every dimension but the first
(activations, so that a sample's quantization does not depend on the rest of its batch); or they
are given (``mean_abs`` / ``max_abs``: a running estimate, see ``estimators.minw``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .registry import Registry

QUANTIZERS: Registry = Registry("quantizer")

#: Default thresholds of the 3-bit powers-of-two quantizer, as fractions of max|x| (the
#: authors' n-BQ-NN code): |x| < 0.02M → 0, < 0.07M → ¼, < 0.14M → ½, otherwise 1.
POW2_THRESHOLDS_3BIT = (0.02, 0.07, 0.14)


def _reduce_dims(x: torch.Tensor, dims) -> tuple[int, ...] | None:
    if dims is None:
        return None
    if dims == "sample":
        return tuple(range(1, x.dim())) if x.dim() > 1 else None
    return tuple(dims)


def _mean_abs(x: torch.Tensor, dims) -> torch.Tensor:
    d = _reduce_dims(x, dims)
    return x.abs().mean() if d is None else x.abs().mean(dim=d, keepdim=True)


def _max_abs(x: torch.Tensor, dims) -> torch.Tensor:
    d = _reduce_dims(x, dims)
    return x.abs().amax() if d is None else x.abs().amax(dim=d, keepdim=True)


@QUANTIZERS.register("sign")
def sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) ∈ {−1, +1}, with sign(+0) = +1 (the BNN convention) and sign(−0) = −1.

    ``copysign(1, x)`` is one vectorised pass (about 10× cheaper here than ``where(x >= 0, 1, −1)``).
    """
    return torch.ones_like(x).copysign_(x)


@QUANTIZERS.register("ternary")
def ternary(x: torch.Tensor, delta_ratio: float = 0.7, dims=None, mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """TWN ternary: 0 if |x| ≤ Δ else sign(x), Δ = delta_ratio·mean|x| (TWN: 0.7). Levels {−1, 0, 1}.

    mean|x| over ``dims``, or ``mean_abs`` when given (broadcastable to x)."""
    delta = delta_ratio * (_mean_abs(x, dims) if mean_abs is None else mean_abs)
    return torch.where(x.abs() > delta, sign(x), torch.zeros((), dtype=x.dtype, device=x.device))


def pow2_thresholds(bits: int) -> tuple[float, ...]:
    """Default lower edges (fractions of max|x|) of the q = 2^(bits−1)−1 non-zero levels.

    Ordered from the zero threshold upwards. At 3 bits these are the authors' (0.02, 0.07, 0.14);
    above 3 bits each level's edge halves with the level (0.14·2^−i for level 2^−i) and the
    zero threshold sits at half the smallest edge.
    """
    if bits < 3:
        raise ValueError(f"powers-of-two quantizer needs bits >= 3, got {bits}")
    if bits == 3:
        return POW2_THRESHOLDS_3BIT
    q = 2 ** (bits - 1) - 1
    edges = [0.14 * 2.0 ** (-i) for i in range(q - 1)]  # levels 1, ½, … down to 2^-(q-2)
    edges.append(edges[-1] / 4)  # lower edge of 2^-(q-1)
    return tuple(reversed(edges))


@QUANTIZERS.register("pow2")
def pow2(x: torch.Tensor, bits: int = 3, thresholds: Sequence[float] | None = None, dims=None,
         max_abs: torch.Tensor | None = None) -> torch.Tensor:
    """Powers of two (MINW-Net Eq. 22, n-BQ-NN staircase): levels {0, ±2^−(q−1), …, ±½, ±1}.

    q = 2^(bits−1) − 1. With M = max|x| (over ``dims``, or ``max_abs`` when given) and thresholds
    t_0 < t_1 < … < t_{q−1} (fractions of M):
    |x| < t_0·M → 0; t_j·M ≤ |x| < t_{j+1}·M → sign(x)·2^−(q−1−j); |x| ≥ t_{q−1}·M → sign(x).
    """
    t = tuple(thresholds) if thresholds is not None else pow2_thresholds(bits)
    q = 2 ** (bits - 1) - 1
    if len(t) != q or any(b <= a for a, b in zip(t, t[1:], strict=False)) or t[0] <= 0:
        raise ValueError(f"pow2 at {bits} bits needs {q} increasing positive thresholds, got {t}")
    m = _max_abs(x, dims) if max_abs is None else max_abs
    a = x.abs()
    edges = torch.tensor(t, dtype=x.dtype, device=x.device)
    # index j = number of edges at or below |x|/M; level = 2^-(q-j) for j ≥ 1, 0 for j = 0
    j = torch.bucketize(a / m.clamp_min(torch.finfo(x.dtype).tiny), edges, right=True)
    mag = torch.where(j > 0, torch.exp2((j - q).to(x.dtype)), torch.zeros((), dtype=x.dtype, device=x.device))
    return sign(x) * mag


@QUANTIZERS.register("uniform")
def uniform(x: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Uniform k-bit (DoReFa's quantize_k). Unsigned: round(clip(x,0,1)·(2^k−1))/(2^k−1) ∈ {0, …, 1}.

    Signed: 2·quantize_k((clip(x,−1,1)+1)/2) − 1, i.e. 2^k evenly spaced levels on [−1, 1]
    ({−1, +1} at 1 bit, {−1, −⅓, ⅓, 1} at 2 bits).
    """
    n = 2**bits - 1
    if signed:
        return 2 * torch.round((x.clamp(-1, 1) + 1) * (n / 2)) / n - 1
    return torch.round(x.clamp(0, 1) * n) / n


def minw_quantizer(bits: int) -> str:
    """The MINW-Net quantizer for a bit width: 1 → sign, 2 → ternary, ≥3 → pow2."""
    return "sign" if bits == 1 else "ternary" if bits == 2 else "pow2"


def grid_quantizer(grid: str, bits: int, role: str) -> str:
    """The quantizer (a name of :func:`levels`) a fixed grid (``estimators.grids``) uses for a bit width and role.

    minw:           sign (1 bit), ternary (2), pow2 (≥3), for weights and activations alike
    uniform:        DoReFa's exactly: weights sign (1 bit) / uniform_signed (≥2), activations uniform ([0, 1])
    uniform_signed: uniform_signed ([−1, 1]) for weights and activations (EWGS's, DSQ's)
    """
    if grid == "minw":
        return minw_quantizer(bits)
    if grid == "uniform":
        return "uniform" if role == "activation" else "sign" if bits == 1 else "uniform_signed"
    if grid == "uniform_signed":
        return "uniform_signed"
    raise ValueError(f"grid {grid!r} has no fixed quantizer; fixed grids: minw, uniform, uniform_signed")


def levels(name: str, bits: int) -> torch.Tensor:
    """The exact (unscaled) level set of a quantizer at a bit width, sorted, float64."""
    if name == "sign":
        vals = [-1.0, 1.0]
    elif name == "ternary":
        vals = [-1.0, 0.0, 1.0]
    elif name == "pow2":
        q = 2 ** (bits - 1) - 1
        mags = [2.0 ** (-i) for i in range(q)]
        vals = sorted([0.0] + mags + [-m for m in mags])
    elif name == "uniform":
        n = 2**bits - 1
        vals = [i / n for i in range(n + 1)]
    elif name == "uniform_signed":
        n = 2**bits - 1
        vals = [2 * i / n - 1 for i in range(n + 1)]
    else:
        raise ValueError(f"no level set for quantizer {name!r}")
    return torch.tensor(vals, dtype=torch.float64)


def get_quantizer(name: str) -> Callable[..., torch.Tensor]:
    """Look a quantizer up by name (error lists the known ones)."""
    return QUANTIZERS.get(name)

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

import functools
import math
from collections.abc import Callable, Sequence

import torch

from .fused_ops import one_thread
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


def _broadcasts_to(s: torch.Tensor, x: torch.Tensor) -> bool:
    """True when a statistic of s's shape broadcasts to x's shape without enlarging it (torch.broadcast_shapes
    costs a hundred microseconds of symbolic-shape machinery per call)."""
    if s.dim() > x.dim():
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(s.shape), reversed(x.shape), strict=False))


def _mean_abs(x: torch.Tensor, dims) -> torch.Tensor:
    d = _reduce_dims(x, dims)
    return x.abs().mean() if d is None else x.abs().mean(dim=d, keepdim=True)


def _max_abs(x: torch.Tensor, dims) -> torch.Tensor:
    d = _reduce_dims(x, dims)
    return x.abs().amax() if d is None else x.abs().amax(dim=d, keepdim=True)


@QUANTIZERS.register("sign")
def sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) ∈ {−1, +1}, with sign(+0) = +1 (the BNN convention) and sign(−0) = −1.

    ``copysign(1, x)`` with the 1 broadcast is one vectorised pass (about 10× cheaper here than
    ``where(x >= 0, 1, −1)``, and a pass cheaper than filling a tensor of ones first).
    """
    return torch.copysign(torch.ones((), dtype=x.dtype, device=x.device), x)


@QUANTIZERS.register("ternary")
def ternary(x: torch.Tensor, delta_ratio: float = 0.7, dims=None, mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """TWN ternary: 0 if |x| ≤ Δ else sign(x), Δ = delta_ratio·mean|x| (TWN: 0.7). Levels {−1, 0, 1}.

    mean|x| over ``dims``, or ``mean_abs`` when given (broadcastable to x). The values of
    :func:`ternary_composed` bit for bit (+0 for |x| ≤ Δ and for NaN x): one Δ on the CPU goes to
    :func:`ternary_at`; otherwise sign(x·1[|x| > Δ]) (x·0 = ±0 and torch.sign(±0) = +0; no host sync)."""
    delta = delta_ratio * (_mean_abs(x, dims) if mean_abs is None else mean_abs)
    if delta.dim() == 0 and x.device.type == "cpu":
        return ternary_at(x, delta.item())
    if not _broadcasts_to(delta, x):
        return ternary_composed(x, delta_ratio, dims, mean_abs)
    with one_thread(x):
        return (x * (x.abs() > delta)).sign_()


def ternary_at(x: torch.Tensor, delta: float) -> torch.Tensor:
    """:func:`ternary` at a threshold Δ given as a number: sign(hardshrink(x, Δ)), two passes.

    hardshrink zeroes −Δ ≤ x ≤ Δ (to +0; NaN stays NaN or becomes +0) and torch.sign maps ±0 and NaN
    to +0, so this is ``where(|x| > Δ, sign(x), +0)``; a NaN Δ (NaN in x's mean) compares false
    everywhere: all +0."""
    if math.isnan(delta):
        return torch.zeros_like(x)
    with one_thread(x):
        return torch.nn.functional.hardshrink(x, delta).sign_()  # in place: no second buffer


def ternary_composed(x: torch.Tensor, delta_ratio: float = 0.7, dims=None,
                     mean_abs: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`ternary` as it was composed (the reference of its tests): where(|x| > Δ, sign(x), 0)."""
    delta = delta_ratio * (_mean_abs(x, dims) if mean_abs is None else mean_abs)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(x.abs() > delta, torch.ones_like(x).copysign_(x), zero)


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
    t = _pow2_checked_thresholds(bits, thresholds)
    if len(t) > POW2_STAIRCASE_LEVELS or (max_abs is not None and not _broadcasts_to(max_abs, x)):
        return pow2_composed(x, bits, t, dims, max_abs)
    with torch.no_grad():
        a = x.detach().abs()
        d = _reduce_dims(x, dims)
        m = (a.amax() if d is None else a.amax(dim=d, keepdim=True)) if max_abs is None else max_abs
        with one_thread(x):
            mag = pow2_staircase(a.div_(m.clamp_min(torch.finfo(x.dtype).tiny)), t)
    return mag.copysign_(x)


#: pow2 builds its staircase from one pass per level up to this many non-zero levels (4 bits); above, bucketize.
POW2_STAIRCASE_LEVELS = 7


def pow2_staircase(u: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """2^−(q−j) (0 for j = 0), j = #{t ≤ u : t in thresholds}, for u = |x|/M: :func:`pow2`'s magnitudes
    (copysign(·, x) gives its values, −0 for negative x below t_0 as sign(x)·0 does).

    Nested from the top level down, one threshold pass each (threshold_backward keeps g where u > the
    float just below t_j, i.e. u ≥ t_j, or u is NaN, as bucketize counts NaN above every edge):
      m = 1[u ≥ t_{q−1}]·2^−1;  m = 1[u ≥ t_j]·(m + w_j) for j = q−2 … 0, w_j = 2^(j−q), w_0 = 2^(1−q)
    Sums of powers of two: exact. No gradient.
    """
    q = len(thresholds)
    below = _floats_below(tuple(thresholds), u.dtype)
    step = torch.ops.aten.threshold_backward
    top = torch.full((), 0.5 if q > 1 else 1.0, dtype=u.dtype, device=u.device).expand(u.shape)
    mag = step(top, u, below[q - 1])
    for j in range(q - 2, -1, -1):
        mag.add_(2.0 ** (j - q) if j > 0 else 2.0 ** (1 - q))
        step.grad_input(mag, u, below[j], grad_input=mag)
    return mag


@functools.cache
def _floats_below(values: tuple[float, ...], dtype: torch.dtype) -> list[float]:
    """For each value v: the largest float of ``dtype`` below v rounded to ``dtype`` (u > it ⟺ u ≥ v)."""
    v = torch.tensor(values, dtype=dtype)
    return torch.nextafter(v, torch.full_like(v, -math.inf)).tolist()


def _pow2_checked_thresholds(bits: int, thresholds: Sequence[float] | None) -> tuple[float, ...]:
    t = tuple(thresholds) if thresholds is not None else pow2_thresholds(bits)
    q = 2 ** (bits - 1) - 1
    if len(t) != q or any(b <= a for a, b in zip(t, t[1:], strict=False)) or t[0] <= 0:
        raise ValueError(f"pow2 at {bits} bits needs {q} increasing positive thresholds, got {t}")
    return t


def pow2_composed(x: torch.Tensor, bits: int = 3, thresholds: Sequence[float] | None = None, dims=None,
                  max_abs: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pow2` as it was composed (the reference of its tests): bucketize |x|/M, exp2, where."""
    t = _pow2_checked_thresholds(bits, thresholds)
    q = len(t)
    m = _max_abs(x, dims) if max_abs is None else max_abs
    a = x.abs()
    edges = torch.tensor(t, dtype=x.dtype, device=x.device)
    # index j = number of edges at or below |x|/M; level = 2^-(q-j) for j ≥ 1, 0 for j = 0
    j = torch.bucketize(a / m.clamp_min(torch.finfo(x.dtype).tiny), edges, right=True)
    mag = torch.where(j > 0, torch.exp2((j - q).to(x.dtype)), torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.ones_like(x).copysign_(x) * mag


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

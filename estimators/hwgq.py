"""HWGQ: half-wave Gaussian quantized activations with binary weights (Cai, He, Sun, Vasconcelos, CVPR 2017)."""
from __future__ import annotations

import math
from functools import cache

import torch

from .base import Param, register_estimator, surrogate
from .minw import LEVEL_PARAMS
from .xnor import XNOR

LLOYD_TOL = 1e-11
LLOYD_MAX_ITER = 1000


def _pdf(t: torch.Tensor) -> torch.Tensor:
    """φ(t) of a unit Gaussian (0 at ∞)."""
    return torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def _half_normal_cells(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cells (a_i, b_i] of levels q around midpoints, a_1 = 0, b_n = ∞, on a unit Gaussian:
    (a, b, P_i = Φ(b) − Φ(a), M_i = φ(a) − φ(b)) — half each cell's half-normal mass and first moment."""
    t = (q[1:] + q[:-1]) / 2
    a = torch.cat([t.new_zeros(1), t])
    b = torch.cat([t, t.new_full((1,), math.inf)])
    return a, b, torch.special.ndtr(-a) - torch.special.ndtr(-b), _pdf(a) - _pdf(b)  # upper tails: exact far out


def _increasing(q: torch.Tensor) -> bool:
    return bool(q[0] > 0) and bool((q[1:] > q[:-1]).all())


def _lloyd_max(n: int) -> torch.Tensor:
    """Solve q_i = E[x | cell i] (Lloyd's fixed point) by Newton's method on F(q) = q − c(q), from the
    companding guess (levels at quantiles of N(0, 3): optimal point density ∝ f^(1/3)); a plain Lloyd
    step q ← c(q) replaces any Newton step that would break the ordering. Plain Lloyd iterations
    converge too, but need ~10^5 steps at 6+ bits."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    q = math.sqrt(3) * torch.special.ndtri((1 + (i - 0.5) / n) / 2)
    for _ in range(LLOYD_MAX_ITER):
        a, b, p, m = _half_normal_cells(q)
        c = m / p
        f = q - c
        if f.abs().max() < LLOYD_TOL:
            return c
        # ∂c_i/∂a = φ(a)(c_i − a)/P_i, ∂c_i/∂b = φ(b)(b − c_i)/P_i; a = t_{i−1}, b = t_i, ∂t/∂q = ½
        dc_da = torch.where(a > 0, _pdf(a) * (c - a) / p, 0.0)
        dc_db = torch.where(torch.isinf(b), 0.0, _pdf(b) * (b - c) / p)
        jac = torch.eye(n, dtype=torch.float64) - torch.diag((dc_da + dc_db) / 2)
        jac -= torch.diag(dc_da[1:] / 2, -1) + torch.diag(dc_db[:-1] / 2, 1)
        step = q - torch.linalg.solve(jac, f)
        q = step if _increasing(step) else c
    raise RuntimeError(f"Lloyd–Max on the half-normal did not converge for {n} levels")


def _uniform_step(n: int) -> torch.Tensor:
    """Levels i·Δ with Δ a fixed point of T(Δ) = Σ i·M_i / Σ i²·P_i over the cells of i·Δ (the
    least-squares step for fixed cells: Lloyd's condition restricted to uniform levels), found by the
    secant method on Δ − T(Δ) from Lloyd's first step."""
    i = torch.arange(1, n + 1, dtype=torch.float64)

    def residual(d: float) -> float:
        _, _, p, m = _half_normal_cells(i * d)
        return d - float((i * m).sum() / (i * i * p).sum())

    d0, d1 = 3.0 / n, 3.0 / n - residual(3.0 / n)
    r0 = residual(d0)
    for _ in range(LLOYD_MAX_ITER):
        r1 = residual(d1)
        if abs(r1) < LLOYD_TOL:
            return i * d1
        d0, d1, r0 = d1, d1 - r1 * (d1 - d0) / (r1 - r0), r1
    raise RuntimeError(f"uniform Lloyd on the half-normal did not converge for {n} levels")


@cache
def half_normal_levels(n: int, kind: str = "uniform") -> tuple[float, ...]:
    """The n positive levels q_1 < … < q_n minimising E[(Q(x) − x)²] for x ~ N(0, 1), x > 0,
    with Q(x) = q_i on (t_{i−1}, t_i], t_0 = 0, t_i = (q_i + q_{i+1})/2, t_n = ∞ (Lloyd's conditions).

    kind="lloyd":   Lloyd–Max, q_i = E[x | cell i] = M_i/P_i (non-uniform; 2 levels: 0.4528, 1.5104,
                    the authors' released non-uniform 2-bit config has centers 0.453, 1.51).
    kind="uniform": q_i = i·Δ with the best Δ for its own cells. At n = 3 (2 bits) Δ = 0.5388: the
                    authors' released configs use centers 0.538, 1.076, 1.614.
    Computed once per (n, kind) in float64 and cached.
    """
    if n < 1 or kind not in ("lloyd", "uniform"):
        raise ValueError(f"half_normal_levels needs n >= 1 and kind lloyd|uniform, got {n}, {kind!r}")
    return tuple((_lloyd_max(n) if kind == "lloyd" else _uniform_step(n)).tolist())


@register_estimator
class HWGQ(XNOR):
    """HWGQ: half-wave Gaussian quantizer for activations, binary weights with a per-filter scale.

    activations forward:  Q(x) = 0 for x ≤ 0;  q_i for t_{i−1} < x ≤ t_i  (t_0 = 0, t_i = (q_i + q_{i+1})/2)
                          with 2^b − 1 positive levels q_i fitted by Lloyd's algorithm to the positive
                          half of a unit Gaussian (BN output): ``levels`` = uniform q_i = i·Δ (default;
                          2 bits: Δ = 0.5388, the authors' released ResNet/AlexNet configs) or lloyd
                          (non-uniform Lloyd–Max; 2 bits: 0.318, 1.000, 1.894)
    activations backward: ∂L/∂x = ∂L/∂y · 1[0 < x ≤ q_max]   (the paper's clipped ReLU, clipped at
                          the largest level, as the authors' code)
    weights:              as ``xnor`` (BWN: W̃ = α·sign(W), α = mean|W_f| per output filter, at 1 bit;
                          HWGQ-Net only uses binary weights, more bits give xnor's scaled ternary / pow2)
    Caveat: the levels assume a BN → quantizer input ~ N(0, 1). MINW-Net blocks put HardTanh before
    the next layer's quantizer, so inputs lie in [−1, 1] and levels above 1 are never reached (2 bits:
    only 0, 0.539 and 1.078 are used).
    """

    table: torch.Tensor  # buffers (typed for the type checker)
    edges: torch.Tensor

    name = "hwgq"
    paper = ("Cai, He, Sun, Vasconcelos, 'Deep Learning with Low Precision by Half-wave Gaussian Quantization', "
             "CVPR 2017")
    grids = ("half_normal",)
    params = {  # XNOR's but the grid and activation statistics, which the half-normal levels don't use
        **LEVEL_PARAMS, "scale": XNOR.params["scale"],
        "levels": Param("uniform", "activation levels on the half-normal: Lloyd-optimal uniform step (the "
                        "authors' released configs) or non-uniform Lloyd–Max", choices=("uniform", "lloyd")),
    }

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        if role == "activation":
            pos = torch.tensor(half_normal_levels(2**bits - 1, self.hparams["levels"]), dtype=torch.float64)
            self.register_buffer("table", torch.cat([pos.new_zeros(1), pos]).float(), persistent=False)
            self.register_buffer("edges", torch.cat([pos.new_zeros(1), (pos[1:] + pos[:-1]) / 2]).float(),
                                 persistent=False)
            self.q_max = float(self.table[-1])

    def _quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Level q_i for x in (t_{i−1}, t_i], 0 for x ≤ 0."""
        return self.table.to(x.dtype)[torch.bucketize(x, self.edges.to(x.dtype))]

    def hard(self, x):
        return super().hard(x) if self.role == "weight" else self._quantize_activation(x)

    def train_forward(self, x):
        if self.role == "weight":
            return super().train_forward(x)
        q_max = self.q_max
        return surrogate(x, self._quantize_activation, lambda t, g: g * ((t > 0) & (t <= q_max)).to(g.dtype))

    def level_set(self):
        return self.table.detach().cpu().double() if self.role == "activation" else super().level_set()

    def scale(self, x):
        return super().scale(x) if self.role == "weight" else None

    def packed_encoding(self):
        return None  # half-wave Gaussian levels and scaled weights have no packed code

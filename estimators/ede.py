"""IR-Net's Error Decay Estimator (EDE) and ReSTE's rectified STE: annealed pseudo-gradients.

Q is MINW-Net's (sign / ternary / powers of two by bits) or the ``grid``'s; the pseudo-gradient,
derived for sign, is applied unchanged to every Q.
"""
from __future__ import annotations

import math

import torch

from . import compiled
from .base import Param, register_estimator
from .fused_ops import all_threads, one_thread
from .minw import MINW_PARAMS, MinwEstimator, clipped_grad


@register_estimator
class EDE(MinwEstimator):
    """Error Decay Estimator (IR-Net): the derivative of k·tanh(t·x), annealed from identity to sign.

    forward:  y = Q(x)
    backward: ∂L/∂x = ∂L/∂y · k·t·(1 − tanh²(t·x))
    schedule: t = T_min·(T_max/T_min)^(e/E),  k = max(1/t, 1)      (paper: T_min = 0.1, T_max = 10)
    proxy:    F(x) = k·tanh(t·x)
    """

    name = "ede"
    paper = ("Qin, Gong, Liu, Bai, Song, Yu, 'Forward and Backward Information Retention for Accurate Binary "
             "Neural Networks' (IR-Net), CVPR 2020")
    scheduled = True
    params = {
        **MINW_PARAMS,
        "t_min": Param(0.1, "t at the first epoch", low=1e-6, high=1e3),
        "t_max": Param(10.0, "t at the last epoch", low=1e-6, high=1e3),
    }

    @property
    def t(self) -> float:
        lo, hi = self.hparams["t_min"], self.hparams["t_max"]
        return lo * (hi / lo) ** self.progress

    @property
    def k(self) -> float:
        return max(1.0 / self.t, 1.0)

    def schedule_values(self):
        return {"t": self.t, "k": self.k}

    def proxy(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * torch.tanh(self.t * x)

    def pseudo_grad(self, x, g):
        with one_thread(x):
            return self._grad_of_abs(x.abs(), g)

    def pseudo_grad_behind_hardtanh(self, h, g):
        with one_thread(h):
            return self._grad_of_abs(h.abs().clamp_max_(1), g)  # |clamp(h, −1, 1)| = min(|h|, 1)

    def _grad_of_abs(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """k·t·(1 − tanh²(t·x)) = 4·k·t·s·(1 − s) for s = σ(−2t·a), a = |x| (overwritten) (even in x; s ≤ ½, no
        cancellation in 1 − s, so the tails are more accurate than 1 − tanh²), with torch's sigmoid, ~6× cheaper
        than its tanh on a CPU."""
        t, k = self.t, self.k
        s = a.mul_(-2 * t)
        with all_threads():
            s.sigmoid_()
        return torch.ops.aten.sigmoid_backward(g, s).mul_(4 * k * t)


def _reste_grad(x, g, p, inv_o, eps, t):
    """ReSTE's pseudo-gradient as one compiled loop (:mod:`.compiled`): g·max(|x|, ε)^p, times 1/o where
    |x| > ε, 0 where |x| > t (p = (1 − o)/o)."""
    a = x.abs()
    gs = torch.exp2(torch.log2(a.clamp_min(eps)) * p) * g
    return torch.where(a <= t, torch.where(a > eps, gs * inv_o, gs), 0.0)


def _reste_grad_behind_hardtanh(h, g, p, inv_o, eps, t):
    """:func:`_reste_grad` at x = clamp(h, −1, 1), in the same one loop."""
    return _reste_grad(h.clamp(-1.0, 1.0), g, p, inv_o, eps, t)


@register_estimator
class ReSTE(MinwEstimator):
    """Rectified straight-through estimator (ReSTE): the power function sign(x)|x|^(1/o).

    forward:  y = Q(x)
    backward: ∂L/∂x = ∂L/∂y · (1/o)·|x|^((1−o)/o)   for ε < |x| ≤ t
                      ∂L/∂y · ε^(1/o)/ε              for |x| ≤ ε   (chord slope, avoids the pole at 0)
                      0                              for |x| > t
    schedule: o = 1 + (o_end − 1)·(1 − cos(π/2 · e/E))       (o = 1 is the clipped STE on [−t, t])
    proxy:    F(x) = sign(x)·|x|^(1/o)
    """

    name = "reste"
    paper = ("Wu, Shen, Wang, Li, Zhang, 'Estimator Meets Equilibrium Perspective: A Rectified Straight Through "
             "Estimator for Binary Neural Networks Training', ICCV 2023")
    scheduled = True
    params = {
        **MINW_PARAMS,
        "o_end": Param(3.0, "power o at the last epoch", low=1.0, high=100.0),
        "t": Param(1.5, "gradient is zero for |x| > t", low=1e-3, high=100.0),
        "eps": Param(0.1, "interval around 0 with the constant chord slope", low=1e-6, high=1.0),
    }

    @property
    def o(self) -> float:
        return 1 + (self.hparams["o_end"] - 1) * (1 - math.cos(math.pi / 2 * self.progress))

    def schedule_values(self):
        return {"o": self.o}

    def proxy(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x) * x.abs().pow(1 / self.o)

    def pseudo_grad(self, x, g):
        """With s = max(|x|, ε)^((1−o)/o) (= the chord slope ε^(1/o)/ε where |x| ≤ ε) and gs = g·s, the
        gradient is gs − inner + inner/o for inner = gs·1[|x| > ε], then the mask |x| ≤ t (skipped when
        every |x| ≤ t): float passes only (threshold_backward), no boolean mask, no where. The power is
        exp2(p·log2 m), m = max(|x|, ε): ATen's CPU ``pow`` is not vectorised, these are (1.8× faster,
        bench/power.py); relative error about (1 + |p·log2 m|·ln 2)·ε, ~1.2 ε at the defaults. Where
        :mod:`.compiled` applies, the same formula runs as one compiled loop instead (2.0–2.1× faster)."""
        o, t, eps = self.o, self.hparams["t"], self.hparams["eps"]
        fused = compiled.run(_reste_grad, x, g, (1 - o) / o, 1 / o, eps, t)
        if fused is not None:
            return fused
        return self._eager_grad(x, g)

    def pseudo_grad_behind_hardtanh(self, h, g):
        o, t, eps = self.o, self.hparams["t"], self.hparams["eps"]
        fused = compiled.run(_reste_grad_behind_hardtanh, h, g, (1 - o) / o, 1 / o, eps, t)
        return self._eager_grad(h.clamp(-1, 1), g, within_one=True) if fused is None else fused

    def _eager_grad(self, x, g, within_one: bool = False):
        """:meth:`pseudo_grad` in ATen passes (``within_one``: |x| ≤ 1 is known, so t ≥ 1 masks nothing)."""
        o, t, eps = self.o, self.hparams["t"], self.hparams["eps"]
        with one_thread(x):
            a = x.abs()
            gs = a.clamp_min(eps)
            with all_threads():
                gs.log2_().mul_((1 - o) / o).exp2_()
            gs.mul_(g)
            inner = torch.ops.aten.threshold_backward(gs, a, eps)
            grad = gs.sub_(inner).add_(inner, alpha=1 / o)
        return grad if within_one and t >= 1 else clipped_grad(x, grad, limit=t)

"""DSQ: differentiable soft quantization (Gong et al., ICCV 2019)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import quantizers as Qz
from .base import Estimator, Param, register_estimator


def dsq_soft(x: torch.Tensor, alpha: torch.Tensor, bits: int, low: float = -1.0, high: float = 1.0):
    """(Q_S(x), hard(x)): DSQ's tanh staircase on [low, high] with 2^bits levels, and its rounding.

    Δ = (u − l)/(2^b − 1), i = interval of x, m_i = l + (i + ½)Δ,
    k = log(2/α − 1)/Δ, s = 1/tanh(½kΔ) = 1/(1 − α), φ = s·tanh(k(x − m_i)),
    Q_S = l + Δ·(i + (φ + 1)/2),  hard = l + Δ·(i + (sign φ + 1)/2).
    """
    n = 2**bits - 1
    delta = (high - low) / n
    xc = x.clamp(low, high)
    i = torch.floor((xc.detach() - low) / delta).clamp(0, n - 1)
    m = low + (i + 0.5) * delta
    k = torch.log(2 / alpha - 1) / delta
    s = 1 / (1 - alpha)
    phi = s * torch.tanh(k * (xc - m))
    soft = low + delta * (i + (phi + 1) / 2)
    hard = low + delta * (i + (Qz.sign(phi.detach()) + 1) / 2)
    return soft, hard


@register_estimator
class DSQ(Estimator):
    """Differentiable Soft Quantization: hard forward, gradient of the tanh soft staircase.

    forward:  y = hard(x) = l + Δ·round((clip(x, l, u) − l)/Δ)            ([l, u] = [−1, 1])
    backward: ∂y/∂x = ∂Q_S/∂x = (Δ/2)·s·k·(1 − tanh²(k(x − m_i)))·1[l ≤ x ≤ u]
              ∂y/∂α = ∂Q_S/∂α, α learnable per layer (the "characteristic variable")
    with Q_S, k, s, m_i as in :func:`dsq_soft`; small α → a sharper, more step-like Q_S.
    """

    name = "dsq"
    paper = "Gong, Liu, Jiang, Li, Hu, Lin, Yu, Yan, 'Differentiable Soft Quantization: Bridging Full-Precision and Low-Bit Neural Networks', ICCV 2019"
    params = {"alpha_init": Param(0.2, "initial characteristic variable α ∈ (0, 1)", low=1e-3, high=0.99)}

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.alpha = nn.Parameter(torch.tensor(float(self.hparams["alpha_init"])))

    def _alpha(self, dtype):
        return self.alpha.to(dtype).clamp(1e-4, 0.999)

    def train_forward(self, x):
        soft, hard = dsq_soft(x, self._alpha(x.dtype), self.bits)
        return soft + (hard - soft).detach()

    def hard(self, x):
        with torch.no_grad():
            return dsq_soft(x, self._alpha(x.dtype), self.bits)[1]

    def schedule_values(self):
        return {"alpha": float(self.alpha.detach())}

    def level_set(self):
        return Qz.levels("uniform_signed", self.bits)

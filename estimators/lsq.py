"""LSQ: learned step size quantization (Esser et al., ICLR 2020)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import quantizers as Qz
from .base import Estimator, register_estimator, round_ste


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value x, gradient scaled by ``scale``."""
    return (x - x * scale).detach() + x * scale


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward, identity backward."""
    return x + (Qz.sign(x) - x).detach()


@register_estimator
class LSQ(Estimator):
    """Learned step size: a per-layer step s trained with its own gradient.

    forward:  v̂ = s·round(clip(v/s, −Q_N, Q_P))     (b ≥ 2: Q_N = 2^(b−1), Q_P = 2^(b−1) − 1;
                                                      b = 1: v̂ = s·sign(v/s) with Q_N = Q_P = 1)
    backward: ∂v̂/∂v = 1[−Q_N ≤ v/s ≤ Q_P]
              ∂v̂/∂s = g·(round(v/s) − v/s) inside, g·(−Q_N) below, g·Q_P above;  g = 1/√(N·Q_P)
    init:     s = 2·mean|v|/√Q_P on the first batch.  Signed for weights and activations alike
              (activations come from HardTanh and are signed).
    """

    initialized: torch.Tensor  # a buffer (typed for the type checker)

    name = "lsq"
    paper = "Esser, McKinstry, Bablani, Appuswamy, Modha, 'Learned Step Size Quantization', ICLR 2020"
    clip_weights = None
    grids = ("learned_step",)

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.q_n, self.q_p = (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    def _init_step(self, v: torch.Tensor) -> None:
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.fill_(float(2 * v.abs().mean() / math.sqrt(self.q_p)))
                self.initialized.fill_(True)

    def train_forward(self, v):
        self._init_step(v)
        n = v.numel() if self.role == "weight" else v[0].numel()
        s = grad_scale(self.step.to(v.dtype), 1.0 / math.sqrt(n * self.q_p))
        u = (v / s).clamp(-self.q_n, self.q_p)
        return (sign_ste(u) if self.bits == 1 else round_ste(u)) * s

    def hard(self, v):
        with torch.no_grad():
            return self.train_forward(v)

    def schedule_values(self):
        return {"step": float(self.step.detach())}

    def level_set(self):
        if self.bits == 1:
            return Qz.levels("sign", 1)
        return torch.arange(-self.q_n, self.q_p + 1, dtype=torch.float64)

    def scale(self, v):
        return self.step.detach().to(v.dtype)

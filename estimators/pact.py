"""PACT: parameterized clipping activation with a learnable clip level α (Choi et al. 2018)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Param, register_estimator
from .dorefa import DoReFa


@register_estimator
class PACT(DoReFa):
    """PACT activations (learnable α per layer) with DoReFa weights.

    activations forward:  y = clip(x, 0, α);  y_q = round(y·(2^k − 1)/α)·α/(2^k − 1)
                backward: ∂y_q/∂x = 1[0 ≤ x < α],   ∂y_q/∂α = 1[x ≥ α]   (STE through round)
    weights:    DoReFa (tanh-normalised, 2·quantize_k(·) − 1; E|W|·sign(W) at 1 bit)
    """

    name = "pact"
    paper = "Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, 'PACT: Parameterized Clipping Activation for Quantized Neural Networks', arXiv:1805.06085, 2018"
    params = {"alpha_init": Param(1.0, "initial clip level α (inputs come from HardTanh, so ≤ 1)", low=1e-3, high=100.0)}

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        if role == "activation":
            self.alpha = nn.Parameter(torch.tensor(float(self.hparams["alpha_init"])))

    def schedule_values(self):
        return {"alpha": float(self.alpha.detach())} if self.role == "activation" else {}

    def train_forward(self, x):
        if self.role == "weight":
            return super().train_forward(x)
        a = self.alpha.to(x.dtype)
        y = torch.where(x < a, x.clamp_min(0), a)
        n = 2**self.bits - 1
        return y + (torch.round(y.detach() * (n / a.detach())) * (a.detach() / n) - y).detach()

    def scale(self, x):
        return self.alpha.detach().to(x.dtype) if self.role == "activation" else super().scale(x)

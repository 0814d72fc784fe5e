"""EWGS: element-wise gradient scaling (Lee, Kim, Ham, CVPR 2021)."""
from __future__ import annotations

import torch

from . import quantizers as Qz
from .base import Estimator, Param, register_estimator, surrogate


@register_estimator
class EWGS(Estimator):
    """Element-wise gradient scaling on a uniform quantizer over [−1, 1].

    forward:  x_n = clip((x + 1)/2, 0, 1),  x_q = round(x_n·(2^b − 1))/(2^b − 1),  y = 2·x_q − 1
    backward: ∂L/∂x = g·(1 + δ·sign(g)·(x_n − x_q))·1[|x| ≤ 1],   g = ∂L/∂y
    δ fixed (the paper's "fixed δ" variant; its Hessian-based δ is not computed here).
    """

    name = "ewgs"
    paper = "Lee, Kim, Ham, 'Network Quantization with Element-wise Gradient Scaling', CVPR 2021"
    params = {"delta": Param(1e-3, "scaling factor δ ≥ 0 (δ = 0 is the clipped STE)", low=0.0, high=10.0)}
    grids = ("uniform_signed",)

    def hard(self, x):
        return Qz.uniform(x, self.bits, signed=True)

    def pseudo_grad(self, x, g):
        n = 2**self.bits - 1
        xn = ((x + 1) / 2).clamp(0, 1)
        xq = torch.round(xn * n) / n
        scale = 1 + self.hparams["delta"] * torch.sign(g) * (xn - xq)
        return g * scale * (x.abs() <= 1).to(x.dtype)

    def train_forward(self, x):
        return surrogate(x, self.hard, self.pseudo_grad)

    def level_set(self):
        return Qz.levels("uniform_signed", self.bits)

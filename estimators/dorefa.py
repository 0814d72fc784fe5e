"""DoReFa-Net (Zhou et al. 2016): tanh-normalised weights and clipped [0, 1] activations."""
from __future__ import annotations

import torch

from . import quantizers as Qz
from .base import Estimator, register_estimator, round_ste


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantizer, differentiable through the normalisation (STE through round).

    k = 1: E(|W|)·sign(W), with ∂/∂W = identity (scale treated as a constant).
    k ≥ 2: 2·quantize_k(tanh(W) / (2·max|tanh W|) + ½) − 1.
    """
    if bits == 1:
        scale = w.detach().abs().mean()
        return w + (Qz.sign(w) * scale - w).detach()
    t = torch.tanh(w)
    u = t / (2 * t.detach().abs().max().clamp_min(1e-12)) + 0.5
    n = 2**bits - 1
    return 2 * round_ste(u * n) / n - 1


def dorefa_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """quantize_k(clip(x, 0, 1)): ∂/∂x = 1[0 ≤ x ≤ 1] (clip), STE through round."""
    n = 2**bits - 1
    return round_ste(x.clamp(0, 1) * n) / n


@register_estimator
class DoReFa(Estimator):
    """DoReFa-Net quantizers with the straight-through estimator through round.

    forward, weights:     k = 1: W_q = E|W|·sign(W);  k ≥ 2: W_q = 2·quantize_k(tanh W / (2 max|tanh W|) + ½) − 1
    forward, activations: x_q = quantize_k(clip(x, 0, 1)),  quantize_k(u) = round((2^k − 1)·u)/(2^k − 1)
    backward:             ∂ round/∂u = 1 (STE); the gradient flows through tanh and clip by autograd
    """

    name = "dorefa"
    paper = "Zhou, Wu, Ni, Zhou, Wen, Zou, 'DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth Gradients', arXiv:1606.06160, 2016"
    clip_weights = None
    grids = ("uniform",)

    def train_forward(self, x):
        return dorefa_weight(x, self.bits) if self.role == "weight" else dorefa_activation(x, self.bits)

    def hard(self, x):
        with torch.no_grad():
            return self.train_forward(x)

    def level_set(self):
        if self.role == "activation":
            return Qz.levels("uniform", self.bits)
        return Qz.levels("sign" if self.bits == 1 else "uniform_signed", self.bits)

    def scale(self, x):
        return x.abs().mean() if self.role == "weight" and self.bits == 1 else None

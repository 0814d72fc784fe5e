"""DoReFa-Net (Zhou et al. 2016): tanh-normalised weights and clipped [0, 1] activations."""
from __future__ import annotations

import torch

from . import quantizers as Qz
from .base import Estimator, register_estimator, round_ste
from .fused_ops import inside_grad, on_one_thread, one_thread


def dorefa_weight_composed(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's weight quantizer as an autograd composition (the reference :class:`DoReFaWeight`
    matches): 2·round_ste(u·n)/n − 1, u = tanh(W) / (2·max|tanh W|) + ½, max|tanh W| a constant."""
    t = torch.tanh(w)
    u = t / (2 * t.detach().abs().max().clamp_min(1e-12)) + 0.5
    n = 2**bits - 1
    return 2 * round_ste(u * n) / n - 1


def dorefa_activation_composed(x: torch.Tensor, bits: int) -> torch.Tensor:
    """quantize_k(clip(x, 0, 1)) as an autograd composition (the reference :class:`DoReFaActivation` matches)."""
    n = 2**bits - 1
    return round_ste(x.clamp(0, 1) * n) / n


class DoReFaWeight(torch.autograd.Function):
    """y = 2·round(u·n)/n − 1, u = tanh(W)/(2m) + ½, m = max|tanh W| (≥ 10⁻¹²), n = 2^k − 1 (k ≥ 2).

    The value of :func:`dorefa_weight_composed` bit for bit; backward (m constant, STE through round):
    ∂L/∂W = g·(1 − tanh²W)/m, which the composition computes as (((g/n)·2)·n)/(2m)·(1 − tanh²W),
    so they agree to rounding.
    """

    @staticmethod
    @on_one_thread
    def forward(ctx, w, bits: int):
        t = torch.tanh(w)
        lo, hi = torch.aminmax(t)
        m2 = 2 * torch.maximum(-lo, hi).clamp_min(1e-12)
        n = 2**bits - 1
        # u·n ≥ 0, so round gives +0 as round_ste does; then 2·r/n − 1 in the composition's order
        y = torch.div(t, m2).add_(0.5).mul_(n).round_().mul_(2).div_(n).sub_(1)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(t, m2)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_one_thread
    def backward(ctx, g):
        t, m2 = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(g, t).mul_(2 / m2), None


class DoReFaActivation(torch.autograd.Function):
    """y = round(clip(x, 0, 1)·n)/n, the value of :func:`dorefa_activation_composed` bit for bit
    (+0 where round gives −0, as round_ste does); ∂L/∂x = g·1[0 < x < 1] (clamp's backward, which
    the composition computes as ((g/n)·n)·1[0 < x < 1]: equal to rounding). At a NaN input the
    gradient is 0 or g (see :func:`~estimators.fused_ops.inside_grad`); the output there is NaN."""

    @staticmethod
    @on_one_thread
    def forward(ctx, x, bits: int):
        n = 2**bits - 1
        y = torch.clamp(x, 0, 1).mul_(n).round_().div_(n).add_(0.0)  # r/n + 0: −0 → +0 as round_ste
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_one_thread
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return inside_grad(g, x, 0.0, 1.0), None


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantizer, differentiable through the normalisation (STE through round).

    k = 1: E(|W|)·sign(W), with ∂/∂W = identity (scale treated as a constant).
    k ≥ 2: 2·quantize_k(tanh(W) / (2·max|tanh W|) + ½) − 1, one :class:`DoReFaWeight`.
    """
    if bits == 1:
        with one_thread(w):  # a few small ops (on one thread where BITBENCH_SERIAL_NUMEL asks: fused_ops.one_thread)
            scale = w.detach().abs().mean()
            return w + (Qz.sign(w) * scale - w).detach()
    return DoReFaWeight.apply(w, bits)


def dorefa_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """quantize_k(clip(x, 0, 1)): ∂/∂x = 1[0 < x < 1] (clip), STE through round; one :class:`DoReFaActivation`."""
    return DoReFaActivation.apply(x, bits)


@register_estimator
class DoReFa(Estimator):
    """DoReFa-Net quantizers with the straight-through estimator through round.

    forward, weights:     k = 1: W_q = E|W|·sign(W);  k ≥ 2: W_q = 2·quantize_k(tanh W / (2 max|tanh W|) + ½) − 1
    forward, activations: x_q = quantize_k(clip(x, 0, 1)),  quantize_k(u) = round((2^k − 1)·u)/(2^k − 1)
    backward:             ∂ round/∂u = 1 (STE); the gradient flows through tanh and clip by autograd
    """

    name = "dorefa"
    paper = ("Zhou, Wu, Ni, Zhou, Wen, Zou, 'DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with "
             "Low Bitwidth Gradients', arXiv:1606.06160, 2016")
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

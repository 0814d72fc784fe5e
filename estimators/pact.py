"""PACT: parameterized clipping activation with a learnable clip level α (Choi et al. 2018)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Param, register_estimator
from .dorefa import DoReFa
from .fused_ops import above_grad, on_one_thread


def pact_composed(x: torch.Tensor, a: torch.Tensor, bits: int) -> torch.Tensor:
    """PACT's activation quantizer as an autograd composition (the reference :class:`PACTFunction`
    matches): y = where(x < α, max(x, 0), α), y + (round(y·n/α)·α/n − y).detach()."""
    y = torch.where(x < a, x.clamp_min(0), a)
    n = 2**bits - 1
    return y + (torch.round(y.detach() * (n / a.detach())) * (a.detach() / n) - y).detach()


class PACTFunction(torch.autograd.Function):
    """y_q = round(y·(n/α))·(α/n), y = where(x < α, max(x, 0), α), for α > 0 (0-dim, x's dtype).

    The value of :func:`pact_composed` bit for bit (where(x < α, max(x, 0), α) is clamp(x, 0, α)
    with NaN → α), one new tensor and in-place passes against 8 autograd ops; the backward is two
    new tensors, a sum and a subtraction, against about 7 ops:

      ∂L/∂x = g·1[0 < x < α]            = g·1[x > 0 or NaN] − g·1[x ≥ α or NaN]
      ∂L/∂α = Σ g·1[x ≥ α or x is NaN]   (where's backward; NaN x is "not below α")

    exactly as the composition computes them (bit for bit, up to the order of the α sum).
    """

    @staticmethod
    @on_one_thread
    def forward(ctx, x, a, bits: int):
        n = 2**bits - 1
        a_value = float(a)
        r = torch.clamp(x, 0, a_value).nan_to_num_(nan=a_value).mul_(n / a).round_()
        y = r.mul_(a / n).add_(0.0)  # r·α/n + 0: the composition's −0 → +0
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, a)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_one_thread
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        above = above_grad(g, x, a)
        ga = above.sum().to(a.dtype) if ctx.needs_input_grad[1] else None
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.threshold_backward(g, x, 0.0)
            gx = torch.sub(gx, above, out=gx)
        return gx, ga, None


def pact_quantize(x: torch.Tensor, a: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pact_composed`'s value and gradients; one :class:`PACTFunction` when α > 0 is finite."""
    if not bool(torch.isfinite(a) & (a > 0)):
        return pact_composed(x, a, bits)
    return PACTFunction.apply(x, a, bits)


@register_estimator
class PACT(DoReFa):
    """PACT activations (learnable α per layer) with DoReFa weights.

    activations forward:  y = clip(x, 0, α);  y_q = round(y·(2^k − 1)/α)·α/(2^k − 1)
                backward: ∂y_q/∂x = 1[0 < x < α],   ∂y_q/∂α = 1[x ≥ α]   (STE through round)
    weights:    DoReFa (tanh-normalised, 2·quantize_k(·) − 1; E|W|·sign(W) at 1 bit)
    """

    name = "pact"
    paper = ("Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, 'PACT: Parameterized Clipping "
             "Activation for Quantized Neural Networks', arXiv:1805.06085, 2018")
    params = {"alpha_init": Param(1.0, "initial clip level α (inputs come from HardTanh, so ≤ 1)",
                                  low=1e-3, high=100.0)}

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        if role == "activation":
            self.alpha = nn.Parameter(torch.tensor(float(self.hparams["alpha_init"])))

    def schedule_values(self):
        return {"alpha": float(self.alpha.detach())} if self.role == "activation" else {}

    def train_forward(self, x):
        if self.role == "weight":
            return super().train_forward(x)
        return pact_quantize(x, self.alpha.to(x.dtype), self.bits)

    def scale(self, x):
        return self.alpha.detach().to(x.dtype) if self.role == "activation" else super().scale(x)

"""EWGS: element-wise gradient scaling (Lee, Kim, Ham, CVPR 2021)."""
from __future__ import annotations

import torch

from . import quantizers as Qz
from .base import Estimator, Param, register_estimator, surrogate
from .fused_ops import inside_grad, on_one_thread


def ewgs_pseudo_grad(x: torch.Tensor, g: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """EWGS's ∂L/∂x from x and g = ∂L/∂y, composed op by op (the reference :class:`EWGSFunction` matches)."""
    n = 2**bits - 1
    xn = ((x + 1) / 2).clamp(0, 1)
    xq = torch.round(xn * n) / n
    scale = 1 + delta * torch.sign(g) * (xn - xq)
    return g * scale * (x.abs() <= 1).to(x.dtype)


def ewgs_composed(x: torch.Tensor, bits: int, delta: float) -> torch.Tensor:
    """The uniform quantizer with EWGS's pseudo-gradient as a generic surrogate (the reference)."""
    return surrogate(x, lambda t: Qz.uniform(t, bits, signed=True), lambda t, g: ewgs_pseudo_grad(t, g, bits, delta))


class EWGSFunction(torch.autograd.Function):
    """y = 2·round(z)/n − 1, z = (clip(x, −1, 1) + 1)·n/2 (``Qz.uniform`` signed, bit for bit), and

      ∂L/∂x = (g + (δ/n)·|g|·(z − round z))·1[|x| ≤ 1]  =  g·(1 + δ·sign(g)·(x_n − x_q))·1[|x| ≤ 1]

    since z = x_n·n exactly (x_n = clip((x + 1)/2, 0, 1), halving is exact) and x_q = round(z)/n.
    The forward keeps z − round z for the backward (two new tensors, the rest in place); the backward
    takes 3 passes instead of about 16, and agrees with the composition to rounding. At a NaN input
    the gradient is 0 or NaN (the composition gives NaN; the output there is NaN).
    """

    @staticmethod
    @on_one_thread
    def forward(ctx, x, bits: int, delta: float):
        n = 2**bits - 1
        z = torch.clamp(x, -1, 1).add_(1).mul_(n / 2)
        r = torch.round(z)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, z.sub_(r))
            ctx.scale = delta / n
        return r.mul_(2).div_(n).sub_(1)  # 2·r/n − 1, in Qz.uniform's order

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_one_thread
    def backward(ctx, g):
        x, frac = ctx.saved_tensors
        gx = torch.abs(g)
        gx = torch.addcmul(g, gx, frac, value=ctx.scale, out=gx)
        one = torch.ones((), dtype=x.dtype)
        limit = torch.nextafter(one, one + 1).item()  # 1[|x| ≤ 1]: ±1 keep their gradient
        return inside_grad(gx, x, -limit, limit, out=gx), None, None


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
        return ewgs_pseudo_grad(x, g, self.bits, self.hparams["delta"])

    def train_forward(self, x):
        return EWGSFunction.apply(x, self.bits, self.hparams["delta"])

    def level_set(self):
        return Qz.levels("uniform_signed", self.bits)

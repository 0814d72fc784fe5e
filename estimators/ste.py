"""Straight-through estimators with a hard forward: STE, clipped STE (BNN), ApproxSign (Bi-Real).

At 2 and 3 bits the forward is the MINW-Net ternary / powers-of-two quantizer and the same
pseudo-gradient is applied to the input, as for sign; so on the other grids (``grid``:
uniform, uniform_signed), where Q is a uniform staircase.
"""
from __future__ import annotations

import torch

from .base import register_estimator
from .fused_ops import one_thread
from .minw import MinwEstimator, clipped_grad, clipped_surrogate


@register_estimator
class STE(MinwEstimator):
    """Straight-through estimator (identity).

    forward:  y = Q(x)                      (Q = sign / ternary / pow2 by bits, or the ``grid``'s)
    backward: ∂L/∂x = ∂L/∂y                 (everywhere, no clipping)
    """

    name = "ste"
    paper = ("Bengio, Léonard, Courville, 'Estimating or propagating gradients through stochastic neurons', "
             "arXiv:1308.3432, 2013")
    pseudo_grad = None  # type: ignore[assignment]  # None: the incoming gradient, untouched (base.surrogate)


@register_estimator
class ClippedSTE(MinwEstimator):
    """Clipped straight-through estimator (BNN), the derivative of HardTanh.

    forward:  y = Q(x)
    backward: ∂L/∂x = ∂L/∂y · 1[|x| ≤ 1]
    """

    name = "clipped_ste"
    paper = "Hubara, Courbariaux, Soudry, El-Yaniv, Bengio, 'Binarized Neural Networks', NeurIPS 2016"

    def pseudo_grad(self, x, g):
        return clipped_grad(x, g)

    def train_forward(self, x):
        return clipped_surrogate(x, self.quantize)


@register_estimator
class ApproxSign(MinwEstimator):
    """ApproxSign (Bi-Real Net): the derivative of a piecewise quadratic approximation of sign.

    forward:  y = Q(x)
    backward: ∂L/∂x = ∂L/∂y · (2 − 2|x|) · 1[|x| < 1]
    proxy:    F(x) = −1 (x < −1); 2x + x² (−1 ≤ x < 0); 2x − x² (0 ≤ x < 1); 1 (x ≥ 1)
    """

    name = "approx_sign"
    paper = "Liu, Wu, Luo, Yang, Liu, Cheng, 'Bi-Real Net', ECCV 2018"

    @staticmethod
    def proxy(x: torch.Tensor) -> torch.Tensor:
        """F(x), whose derivative is the pseudo-gradient (x is clamped to [−1, 1] first: beyond it the
        quadratics turn back, e.g. 2x + x² = 3 at x = −3)."""
        x = x.clamp(-1, 1)
        return torch.where(x < 0, 2 * x + x * x, 2 * x - x * x)

    def pseudo_grad(self, x, g):
        """g·max(2 − 2|x|, 0) = 2·(1 − a)·g for a = min(|x|, 1), the last as MSE's backward kernel in one pass into
        a's buffer (bit for bit (2 − 2a)·g: the ×2 is exact; a new buffer where autograd records a double
        backward)."""
        with one_thread(x):
            a = x.abs().clamp_max_(1)
            one = torch.ones((), dtype=a.dtype, device=a.device).expand_as(a)
            if torch.is_grad_enabled():
                return torch.ops.aten.mse_loss_backward(g, one, a, 0)  # 0: no reduction
            return torch.ops.aten.mse_loss_backward.grad_input(g, one, a, 0, grad_input=a)

    def pseudo_grad_behind_hardtanh(self, h, g):
        """:meth:`pseudo_grad` at h is already the one at x = clamp(h, −1, 1), bit for bit: it takes min(|·|, 1)."""
        return self.pseudo_grad(h, g)

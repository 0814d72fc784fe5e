"""XNOR-Net: binary weights with a per-filter scale (Rastegari et al., ECCV 2016)."""
from __future__ import annotations

import torch

from .base import register_estimator, surrogate
from .minw import MinwEstimator, clip_mask, clipped_grad


def filter_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """α_f = ‖W_f‖₁ / n: mean |W| over every dimension but the output channel (dim 0)."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() > 1 else w.abs().mean()


@register_estimator
class XNOR(MinwEstimator):
    """XNOR-Net weight scaling with the paper's weight gradient; activations as the clipped STE.

    weights  forward:  W̃ = α·Q(W),  α = mean|W_f| per output filter (n = c·k·k weights)
             backward: ∂L/∂W = ∂L/∂W̃ · (1/n + α·1[|W| ≤ 1])            (XNOR-Net Sec. 3.1)
    activations: y = Q(x), ∂L/∂x = ∂L/∂y · 1[|x| ≤ 1]  (the K = mean|A| map is left out, as in
    most re-implementations: BN after every conv absorbs a per-channel scale)
    """

    name = "xnor"
    paper = "Rastegari, Ordonez, Redmon, Farhadi, 'XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks', ECCV 2016"

    def scale(self, x):
        return filter_mean_abs(x) if self.role == "weight" else None

    def hard(self, x):
        q = self.quantize(x)
        return q * self.scale(x) if self.role == "weight" else q

    def train_forward(self, x):
        if self.role != "weight":
            return surrogate(x, self.quantize, clipped_grad)
        alpha = filter_mean_abs(x.detach())
        n = x[0].numel() if x.dim() > 1 else x.numel()
        return surrogate(
            x,
            lambda t: self.quantize(t).mul_(alpha),
            lambda t, g: g * (clip_mask(t).mul_(alpha).add_(1.0 / n)),
        )

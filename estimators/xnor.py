"""XNOR-Net: binary weights with a per-filter scale (Rastegari et al., ECCV 2016); TWN's scale as an option."""
from __future__ import annotations

import torch

from .base import Param, register_estimator, surrogate
from .minw import MINW_PARAMS, MinwEstimator, clip_mask, clipped_grad, clipped_surrogate


def filter_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """α_f = ‖W_f‖₁ / n: mean |W| over every dimension but the output channel (dim 0)."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) if w.dim() > 1 else w.abs().mean()


def least_squares_scale(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """α = ⟨W, Q⟩ / ⟨Q, Q⟩ over the whole tensor, the α minimising ‖W − α·Q‖² (0 when Q = 0).

    For ternary Q this is TWN's α = mean of |W_i| over {i : |W_i| > Δ}; for sign, mean|W|.
    """
    den = (q * q).sum()
    return (w * q).sum() / den.clamp_min(torch.finfo(w.dtype).tiny)


@register_estimator
class XNOR(MinwEstimator):
    """Scaled low-bit weights: XNOR-Net's per-filter scale (default) or TWN's per-layer scale.

    weights, scale="filter" (XNOR-Net Sec. 3.1; BWN when activations are float):
             forward:  W̃ = α·Q(W),  α = mean|W_f| per output filter (n = c·k·k weights)
             backward: ∂L/∂W = ∂L/∂W̃ · (1/n + α·1[|W| ≤ 1])
    weights, scale="twn" (Li, Zhang, Liu, 'Ternary Weight Networks', arXiv:1605.04711, 2016):
             forward:  W̃ = α·Q(W),  α = ⟨W, Q(W)⟩ / ⟨Q(W), Q(W)⟩ per layer, i.e. at 2 bits
                       α = mean of |W| over |W| > Δ with Δ = delta_ratio·mean|W| (TWN: 0.7)
             backward: ∂L/∂W = ∂L/∂W̃ · 1[|W| ≤ 1]  (TWN updates the latent weights with the
                       ternary weights' gradient, α held constant; latent weights are clipped
                       to [−1, 1], so the mask only matters for unclipped inputs)
    activations (either scale): y = Q(x), ∂L/∂x = ∂L/∂y · 1[|x| ≤ 1]  (the K = mean|A| map is
    left out, as in most re-implementations: BN after every conv absorbs a per-channel scale)
    Q: sign (1 bit), ternary (2 bits), powers of two (≥3 bits), as MINW-Net's, or the ``grid``'s
    (the 1/n term is sign's on every grid, as at 2 and 3 bits).
    """

    name = "xnor"
    paper = ("Rastegari, Ordonez, Redmon, Farhadi, 'XNOR-Net: ImageNet Classification Using Binary Convolutional "
             "Neural Networks', ECCV 2016")
    params = {
        **MINW_PARAMS,
        "scale": Param("filter", "weight scale α: XNOR-Net's per-filter mean|W|, or TWN's per-layer least-squares "
                       "α (mean |W| over |W| > Δ at 2 bits)", choices=("filter", "twn")),
    }

    def scale(self, x):
        if self.role != "weight":
            return None
        return least_squares_scale(x, self.quantize(x)) if self.hparams["scale"] == "twn" else filter_mean_abs(x)

    def hard(self, x):
        q = self.quantize(x)
        return q * self.scale(x) if self.role == "weight" else q

    def packed_encoding(self):
        return None if self.role == "weight" else super().packed_encoding()  # scaled weights: no packed code

    def train_forward(self, x):
        if self.role != "weight":
            return clipped_surrogate(x, self.quantize)
        if self.hparams["scale"] == "twn":
            q = self.quantize(x.detach())
            alpha = least_squares_scale(x.detach(), q)
            return surrogate(x, lambda t: q * alpha, clipped_grad)
        alpha = filter_mean_abs(x.detach())
        n = x[0].numel() if x.dim() > 1 else x.numel()
        return surrogate(
            x,
            lambda t: self.quantize(t).mul_(alpha),
            lambda t, g: g * (clip_mask(t).mul_(alpha).add_(1.0 / n)),
        )

"""Estimators on the MINW-Net level sets: sign (1 bit), ternary (2 bits), powers of two (≥3 bits).

:class:`MinwEstimator` holds what AQE and the sign-family baselines (STE, clipped STE,
ApproxSign, EDE, ReSTE, XNOR) share: the hard quantizer ``Q`` chosen by bit width (Chen et al.,
Eq. 4, 21, 22), its parameters, and per-tensor statistics for weights / per-sample statistics
for activations. Subclasses give the training forward and the pseudo-gradient.
"""
from __future__ import annotations

import torch

from . import quantizers as Qz
from .base import Estimator, Param, surrogate

def increasing_fractions(value) -> list[float]:
    """A list of strictly increasing numbers in (0, 1] (how many the bit width needs is checked
    when the quantizer is built)."""
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError("expected a non-empty list of numbers")
    if value[0] <= 0 or value[-1] > 1 or any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError("expected strictly increasing fractions in (0, 1]")
    return [float(v) for v in value]


MINW_PARAMS = {
    "delta_ratio": Param(0.7, "ternary threshold Δ = delta_ratio·mean|x| (TWN's rule)", low=0.0, high=1.0),
    "pow2_thresholds": Param(
        None, "≥3-bit powers-of-two thresholds as increasing fractions of max|x| (default 0.02, 0.07, 0.14 at 3 bits)",
        validate=increasing_fractions,
    ),
}


class MinwEstimator(Estimator):
    """Base for estimators whose hard quantizer Q is MINW-Net's: sign / ternary / pow2 by bits."""

    params = MINW_PARAMS

    def __init__(self, bits: int = 1, role: str = "weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.quantizer = Qz.minw_quantizer(bits)
        self._dims = None if role == "weight" else "sample"
        if self.quantizer == "pow2":  # fail at construction, not at the first batch
            Qz.pow2(torch.ones(1), bits=bits, thresholds=self.hparams["pow2_thresholds"])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x): the MINW-Net hard quantizer for this bit width (no gradient of its own)."""
        if self.quantizer == "sign":
            return Qz.sign(x)
        if self.quantizer == "ternary":
            return Qz.ternary(x, self.hparams["delta_ratio"], dims=self._dims)
        return Qz.pow2(x, self.bits, self.hparams["pow2_thresholds"], dims=self._dims)

    def hard(self, x):
        return self.quantize(x)

    def level_set(self):
        return Qz.levels(self.quantizer, self.bits)

    def packed_encoding(self) -> str | None:
        return self.quantizer  # unscaled sign / ternary / powers of two

    def pseudo_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """∂L/∂x given x and ∂L/∂y. A subclass sets ``pseudo_grad = None`` for the identity."""
        raise NotImplementedError

    def train_forward(self, x):
        return surrogate(x, self.quantize, self.pseudo_grad)


def clip_mask(x: torch.Tensor, limit: float = 1.0) -> torch.Tensor:
    """1[|x| ≤ limit] as a tensor of x's dtype."""
    return (x.abs() <= limit).to(x.dtype)


def clipped_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g·1[|x| ≤ 1] in one fused pass (HardTanh's backward kernel).

    That kernel zeroes |x| ≥ limit; with limit = the next float above 1 in x's dtype this is
    exactly |x| ≤ 1, so latent weights clipped to ±1 keep their gradient.
    """
    one = torch.ones((), dtype=x.dtype)
    limit = torch.nextafter(one, one + 1).item()
    return torch.ops.aten.hardtanh_backward(g, x, -limit, limit)

"""Quantized layers: an activation quantizer, a conv and a linear layer (larq-style).

``QConv2d`` / ``QLinear`` quantize their *input* to ``a_bits`` and their *weight* to ``w_bits``
with a named estimator; 32 bits means "not quantized" (the paper's float rows). The estimator is
given as a name plus parameters, or as ``(name, params)``; each role gets its own instance, so
learnable quantizer parameters (PACT's α, LSQ's step, DSQ's α) are per layer and per role.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import FLOAT_BITS, Estimator, create_estimator

EstimatorArg = str | tuple[str, dict[str, Any]]


def make_quantizer(estimator: EstimatorArg, bits: int, role: str, params: dict | None = None) -> Estimator | None:
    """An estimator for (bits, role), or None when bits == 32 (float)."""
    if bits == FLOAT_BITS:
        return None
    name, extra = (estimator, {}) if isinstance(estimator, str) else estimator
    return create_estimator(name, bits=bits, role=role, **{**extra, **(params or {})})


class QuantAct(nn.Module):
    """Quantizes activations to ``bits`` with an estimator (identity at 32 bits)."""

    def __init__(self, bits: int = 1, estimator: EstimatorArg = "aqe", estimator_params: dict | None = None):
        super().__init__()
        self.bits = bits
        self.quantizer = make_quantizer(estimator, bits, "activation", estimator_params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.quantizer is None else self.quantizer(x)


class _QuantizedWeights:
    """Mixin: holds ``input_quantizer`` and ``weight_quantizer`` and yields the quantized weight."""

    weight: torch.Tensor  # the nn.Conv2d / nn.Linear it is mixed into holds it

    def _setup_quantizers(self, w_bits, a_bits, estimator, estimator_params):
        self.w_bits, self.a_bits = w_bits, a_bits
        self.input_quantizer = QuantAct(a_bits, estimator, estimator_params)
        self.weight_quantizer = make_quantizer(estimator, w_bits, "weight", estimator_params)

    def quantized_weight(self) -> torch.Tensor:
        w = self.weight
        return w if self.weight_quantizer is None else self.weight_quantizer(w)


class QConv2d(_QuantizedWeights, nn.Conv2d):
    """Conv2d with ``a_bits`` input and ``w_bits`` weight quantization (no bias by default)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False, *,
                 w_bits: int = 1, a_bits: int = 1, estimator: EstimatorArg = "aqe",
                 estimator_params: dict | None = None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, **kwargs)
        self._setup_quantizers(w_bits, a_bits, estimator, estimator_params)

    def forward(self, x):
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QLinear(_QuantizedWeights, nn.Linear):
    """Linear with ``a_bits`` input and ``w_bits`` weight quantization (no bias by default)."""

    def __init__(self, in_features, out_features, bias=False, *, w_bits: int = 1, a_bits: int = 1,
                 estimator: EstimatorArg = "aqe", estimator_params: dict | None = None, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self._setup_quantizers(w_bits, a_bits, estimator, estimator_params)

    def forward(self, x):
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QUANTIZED_LAYERS = (QConv2d, QLinear)

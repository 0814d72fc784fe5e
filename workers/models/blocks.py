"""Shared building blocks: the quantized-layer factory and the paper's two block types.

MINW-Net (Chen et al. 2020, Sec. III-E) builds networks from {QConv – pool – BN – HardTanh} and
{QConv – BN – HardTanh}; the HardTanh output is quantized by the *next* layer's input quantizer
(``QConv2d`` / ``QLinear`` quantize their input to a_bits and their weight to w_bits).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from estimators import FLOAT_BITS, QConv2d, QLinear
from estimators.layers import EstimatorArg

Position = Literal["first", "middle", "last"]


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths and estimator for a whole model; makes its quantized layers.

    Per layer position:  first → weights w_bits (32 if first_last_float), input always 32 (raw image);
                         middle → w_bits / a_bits;
                         last → w_bits / a_bits, or 32 / 32 if first_last_float.
    """

    w_bits: int = 1
    a_bits: int = 1
    estimator: EstimatorArg = "aqe"
    estimator_params: dict | None = None
    first_last_float: bool = False

    def bits(self, position: Position = "middle") -> tuple[int, int]:
        """(w_bits, a_bits) of a layer at ``position``."""
        if position == "first":
            return (FLOAT_BITS if self.first_last_float else self.w_bits), FLOAT_BITS
        if position == "last" and self.first_last_float:
            return FLOAT_BITS, FLOAT_BITS
        if position not in ("middle", "last"):
            raise ValueError(f"unknown layer position {position!r}; known: first, middle, last")
        return self.w_bits, self.a_bits

    def _kw(self, position: Position) -> dict:
        w, a = self.bits(position)
        return dict(w_bits=w, a_bits=a, estimator=self.estimator, estimator_params=self.estimator_params)

    def conv(self, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, padding: int = 1,
             position: Position = "middle") -> QConv2d:
        return QConv2d(cin, cout, kernel, stride, padding, bias=False, **self._kw(position))

    def linear(self, fin: int, fout: int, *, bias: bool = False, position: Position = "middle") -> QLinear:
        return QLinear(fin, fout, bias=bias, **self._kw(position))


def conv_block(q: QuantConfig, cin: int, cout: int, *, padding: int = 1, stride: int = 1, pool: bool = False,
               position: Position = "middle") -> nn.Sequential:
    """QConv3×3 – [MaxPool2] – BN – HardTanh."""
    layers = [q.conv(cin, cout, 3, stride=stride, padding=padding, position=position)]
    layers += [nn.MaxPool2d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm2d(cout), nn.Hardtanh())


def linear_block(q: QuantConfig, fin: int, fout: int, *, position: Position = "middle") -> nn.Sequential:
    """QLinear – BN – HardTanh."""
    return nn.Sequential(q.linear(fin, fout, position=position), nn.BatchNorm1d(fout), nn.Hardtanh())


def conv_out(size: int, kernel: int = 3, padding: int = 1, stride: int = 1) -> int:
    """Output length of a convolution along one spatial axis."""
    return (size + 2 * padding - kernel) // stride + 1


ConvSpec = tuple[int, int, bool]
"""(out_channels, padding, pool) of one 3×3 conv block."""


def plain_convnet(q: QuantConfig, input_shape: tuple[int, int, int], num_classes: int, *, convs: Sequence[ConvSpec],
                  fcs: Sequence[int] = (), head_bn: bool = True, name: str = "model") -> nn.Sequential:
    """conv blocks → flatten → linear blocks → QLinear(num_classes) [→ BatchNorm1d].

    The flattened size follows ``input_shape`` by arithmetic (no dry run: some estimators
    initialise themselves on their first batch). The head has a bias only when no BN follows.
    """
    c, h, w = input_shape
    feats = []
    for i, (cout, pad, pool) in enumerate(convs):
        feats.append(conv_block(q, c, cout, padding=pad, pool=pool, position="first" if i == 0 else "middle"))
        h, w = conv_out(h, 3, pad), conv_out(w, 3, pad)
        h, w, c = (h // 2, w // 2, cout) if pool else (h, w, cout)
        if min(h, w) < 1:
            raise ValueError(
                f"{name}: input_shape {tuple(input_shape)} is too small (feature map vanishes at conv {i + 1})")
    fin = c * h * w
    fc = []
    for fout in fcs:
        fc.append(linear_block(q, fin, fout, position="middle" if feats else "first"))
        fin = fout
    fc.append(q.linear(fin, num_classes, bias=not head_bn, position="last"))
    fc += [nn.BatchNorm1d(num_classes)] if head_bn else []
    return nn.Sequential(OrderedDict(features=nn.Sequential(*feats), flatten=nn.Flatten(),
                                     classifier=nn.Sequential(*fc)))

"""DenseNet-BC for CIFAR (Huang et al. 2017, Sec. 3–4) with quantized convs: ``densenet100``.

DenseNet-BC, L = 100, k = 12 (the paper's Table III "DenseNet 100"; 0.8 M parameters in Huang
et al.'s Table 2: 769,162 here at 10 classes, 800,032 at 100)::

    stem:        QConv3×3 2k = 24                                   (first layer: float input)
    3 dense blocks of n = (L − 4) / 6 = 16 bottleneck layers, each adding k channels:
        BN – HT – QConv1×1 4k – BN – HT – QConv3×3 k, concatenated to its input
    transitions: BN – HT – QConv1×1 ⌊θ·C⌋ – AvgPool2 (compression θ = ½) after blocks 1 and 2
    head:        BN – HT – global average pool – QLinear num_classes (with bias)  (last layer)

Channels: 24 → 216 → 108 → 300 → 150 → 342. Pre-activation order as in the original, with
HardTanh in place of ReLU (MINW-Net's activation): every quantized conv's input is a HardTanh
output in [−1, 1], quantized by the conv's own input quantizer; the concatenated features are
the convs' float outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import QuantConfig
from .registry import register_model


def _pre(q: QuantConfig, cin: int, cout: int, kernel: int) -> list[nn.Module]:
    """BN – HT – QConv kernel×kernel ('same' padding)."""
    return [nn.BatchNorm2d(cin), nn.Hardtanh(), q.conv(cin, cout, kernel, padding=kernel // 2)]


class Bottleneck(nn.Module):
    """BN – HT – QConv1×1 (4k) – BN – HT – QConv3×3 (k); returns [x, new k channels]."""

    def __init__(self, q: QuantConfig, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(*_pre(q, cin, 4 * growth, 1), *_pre(q, 4 * growth, growth, 3))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """DenseNet-BC of ``depth`` L (3 dense blocks of (L − 4)/6 bottlenecks), growth ``growth``,
    transition ``compression``; any input of at least 4×4 (two 2× average pools)."""

    def __init__(self, q: QuantConfig, input_shape, num_classes: int, depth: int = 100, growth: int = 12,
                 compression: float = 0.5):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"DenseNet-BC has depth 6n + 4 (40, 100, 190, ...), not {depth}")
        if min(input_shape[1:]) < 4:
            raise ValueError(f"densenet: input_shape {tuple(input_shape)} is too small (needs at least 4×4)")
        n = (depth - 4) // 6
        c = 2 * growth
        layers: list[nn.Module] = [q.conv(input_shape[0], c, 3, position="first")]
        for block in range(3):
            for _ in range(n):
                layers.append(Bottleneck(q, c, growth))
                c += growth
            if block < 2:
                out = int(compression * c)
                layers.append(nn.Sequential(*_pre(q, c, out, 1), nn.AvgPool2d(2)))
                c = out
        layers += [nn.BatchNorm2d(c), nn.Hardtanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = q.linear(c, num_classes, bias=True, position="last")

    def forward(self, x):
        return self.fc(self.features(x))


@register_model("densenet100")
def densenet100(q, *, num_classes, input_shape):
    """DenseNet-BC-100 (k = 12): 3 blocks × 16 bottlenecks, compression ½; 0.77 M parameters."""
    return DenseNet(q, input_shape, num_classes, depth=100, growth=12)

"""ResNet-20 for CIFAR (He et al. 2016, Sec. 4.2) with quantized 3×3 convs.

    stem:   QConv3×3 16 – BN – HT                      (first layer: float input)
    stages: 3 × BasicBlock at 16, 32, 64 channels; stride 2 at the start of stages 2 and 3
    head:   global average pool – QLinear num_classes (with bias)   (last layer)

BasicBlock (the standard block as in IR-Net's / ReSTE's ResNet-20, *not* Bi-Real's
one-shortcut-per-conv; HardTanh in place of ReLU so activations live in [−1, 1])::

    out = HT(BN(QConv3×3(x)));  out = HT(BN(QConv3×3(out)) + shortcut(x))

Shortcut: option A, parameter-free: identity, or when the shape changes, x[:, :, ::2, ::2]
zero-padded to the new channel count (so no quantized 1×1 convs; shortcuts carry float values).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import QuantConfig, conv_block
from .registry import register_model


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad channels cin → cout."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """Two quantized 3×3 convs with BN and HardTanh and an option-A shortcut."""

    def __init__(self, q: QuantConfig, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_block(q, cin, cout, stride=stride)
        self.conv2 = q.conv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.Hardtanh()
        self.shortcut = ZeroPadShortcut(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class CifarResNet(nn.Module):
    """stem – stages of BasicBlocks – global average pool – linear (any input size ≥ 1×1)."""

    def __init__(self, q: QuantConfig, input_shape, num_classes: int, widths=(16, 32, 64), blocks: int = 3):
        super().__init__()
        self.stem = conv_block(q, input_shape[0], widths[0], position="first")
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(q, cin, cout, stride=2 if i > 0 and j == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = q.linear(cin, num_classes, bias=True, position="last")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


@register_model("resnet20")
def resnet20(q, *, num_classes, input_shape):
    """ResNet-20: 16-32-64 channels, 3 stages × 3 BasicBlocks (19 quantized convs + stem + FC)."""
    return CifarResNet(q, input_shape, num_classes)

"""ResNets with quantized convs (He et al. 2016): the CIFAR family and the ImageNet ResNet-18.

CIFAR family (Sec. 4.2), depth 6n + 2 — ``resnet20`` (n = 3, 0.27 M parameters) and
``resnet110`` (n = 18, 1.73 M; the paper's Table III and He et al.'s "1.7M")::

    stem:   QConv3×3 16 – BN – HT                      (first layer: float input)
    stages: 3 × n BasicBlocks at 16, 32, 64 channels; stride 2 at the start of stages 2 and 3
    head:   global average pool – QLinear num_classes (with bias)   (last layer)

Shortcut option A, parameter-free: identity, or when the shape changes, x[:, :, ::2, ::2]
zero-padded to the new channel count (so no quantized 1×1 convs; shortcuts carry float values).

ImageNet ``resnet18`` (Table 1; 11,689,512 parameters at 1000 classes, torchvision's count)::

    stem:   QConv7×7/2 64 – BN – HT – MaxPool3×3/2     (first layer)
    stages: 2 BasicBlocks each at 64, 128, 256, 512 channels; stride 2 at the start of stages 2–4
    head:   global average pool – QLinear num_classes (with bias)   (last layer)

Shortcut option B: a projection QConv1×1/2 – BN where the shape changes. The projection is a
quantized middle layer like every conv but the stem (the paper's Table V marks only the first
and last layers as possibly float); its input is the block input, a HardTanh output.

BasicBlock (the standard block as in IR-Net's / ReSTE's ResNet-20, *not* Bi-Real's
one-shortcut-per-conv; HardTanh in place of ReLU so activations live in [−1, 1], MINW-Net's
{QConv – BN – HardTanh})::

    out = HT(BN(QConv3×3(x)));  out = HT(BN(QConv3×3(out)) + shortcut(x))
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import QuantConfig, conv_block
from .registry import register_model

Shortcut = Literal["A", "B"]


class ZeroPadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad channels cin → cout."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def make_shortcut(q: QuantConfig, cin: int, cout: int, stride: int, kind: Shortcut) -> nn.Module:
    """Identity when the shape is kept; else option A (zero padding) or B (QConv1×1 – BN)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return ZeroPadShortcut(cin, cout, stride)
    if kind == "B":
        return nn.Sequential(q.conv(cin, cout, 1, stride=stride, padding=0), nn.BatchNorm2d(cout))
    raise ValueError(f"unknown shortcut {kind!r}; known: A, B")


class BasicBlock(nn.Module):
    """Two quantized 3×3 convs with BN and HardTanh and a shortcut of option ``shortcut``."""

    def __init__(self, q: QuantConfig, cin: int, cout: int, stride: int = 1, shortcut: Shortcut = "A"):
        super().__init__()
        self.conv1 = conv_block(q, cin, cout, stride=stride)
        self.conv2 = q.conv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.Hardtanh()
        self.shortcut = make_shortcut(q, cin, cout, stride, shortcut)

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


def imagenet_stem(q: QuantConfig, cin: int, cout: int) -> nn.Sequential:
    """QConv7×7/2 (first layer) – BN – HT – MaxPool3×3/2: 224 → 56."""
    return nn.Sequential(q.conv(cin, cout, 7, stride=2, padding=3, position="first"), nn.BatchNorm2d(cout),
                         nn.Hardtanh(), nn.MaxPool2d(3, stride=2, padding=1))


class ResNet(nn.Module):
    """stem – stages of BasicBlocks – global average pool – linear (any input size ≥ 1×1).

    ``stem`` is "cifar" (QConv3×3 – BN – HT) or "imagenet" (:func:`imagenet_stem`), producing
    ``widths[0]`` channels; stage i has ``blocks`` BasicBlocks at ``widths[i]`` channels, the first
    of each stage after the first with stride 2.
    """

    def __init__(self, q: QuantConfig, input_shape, num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 blocks: int = 3, *, stem: Literal["cifar", "imagenet"] = "cifar", shortcut: Shortcut = "A"):
        super().__init__()
        if stem == "cifar":
            self.stem = conv_block(q, input_shape[0], widths[0], position="first")
        elif stem == "imagenet":
            self.stem = imagenet_stem(q, input_shape[0], widths[0])
        else:
            raise ValueError(f"unknown stem {stem!r}; known: cifar, imagenet")
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(q, cin, cout, stride=2 if i > 0 and j == 0 else 1, shortcut=shortcut))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = q.linear(cin, num_classes, bias=True, position="last")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def cifar_resnet(q: QuantConfig, input_shape, num_classes: int, depth: int) -> ResNet:
    """The CIFAR ResNet of ``depth`` = 6n + 2 layers: n BasicBlocks per stage at 16-32-64 channels."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), not {depth}")
    return ResNet(q, input_shape, num_classes, (16, 32, 64), (depth - 2) // 6)


@register_model("resnet20")
def resnet20(q, *, num_classes, input_shape):
    """ResNet-20: 16-32-64 channels, 3 stages × 3 BasicBlocks (18 quantized convs + stem + FC)."""
    return cifar_resnet(q, input_shape, num_classes, 20)


@register_model("resnet110")
def resnet110(q, *, num_classes, input_shape):
    """ResNet-110: 16-32-64 channels, 3 stages × 18 BasicBlocks (108 quantized convs + stem + FC)."""
    return cifar_resnet(q, input_shape, num_classes, 110)


@register_model("resnet18")
def resnet18(q, *, num_classes, input_shape):
    """ImageNet ResNet-18: 7×7 stem and max-pool, 64-128-256-512 channels × 2 BasicBlocks, 1×1 projections."""
    return ResNet(q, input_shape, num_classes, (64, 128, 256, 512), 2, stem="imagenet", shortcut="B")

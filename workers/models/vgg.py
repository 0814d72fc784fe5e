"""VGG-Small, the CIFAR VGG of LQ-Nets (Zhang et al. 2018) and IR-Net (Qin et al. 2020).

    QConv 128 – BN – HT – QConv 128 – MP2 – BN – HT – QConv 256 – BN – HT – QConv 256 – MP2 – BN – HT –
    QConv 512 – BN – HT – QConv 512 – MP2 – BN – HT – QFC num_classes (with bias)

All convs 3×3, padding 1 (32→16→8→4, FC input 512·4·4). The first conv's input is float; its
weights and the FC follow ``first_last_float`` (IR-Net keeps both float).
"""
from __future__ import annotations

from .blocks import plain_convnet
from .registry import register_model

VGG_SMALL = [(128, 1, False), (128, 1, True), (256, 1, False), (256, 1, True), (512, 1, False), (512, 1, True)]


@register_model("vgg_small")
def vgg_small(q, *, num_classes, input_shape):
    """VGG-Small: 128-128-MP-256-256-MP-512-512-MP, FC num_classes."""
    return plain_convnet(q, input_shape, num_classes, convs=VGG_SMALL, head_bn=False, name="vgg_small")

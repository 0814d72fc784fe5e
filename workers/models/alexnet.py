"""AlexNet with BatchNorm in place of LRN for ImageNet: ``alexnet_bn`` (the paper's Table IV).

The paper says only "LRN is replaced by BN"; the layout is the authors' code (n-BQ-NN
``models/alexnet.py``: TF-slim's ``alexnet_v2`` with BN after every layer, no dropout)::

    QConv 64 11×11/4 (no pad) – BN – HT – MP3/2 – QConv 192 5×5 – BN – HT – MP3/2 –
    QConv 384 3×3 – BN – HT – QConv 384 3×3 – BN – HT – QConv 256 3×3 – BN – HT – MP3/2 –
    QFC 4096 – BN – HT – QFC 4096 – BN – HT – QFC num_classes – BN

224 → 54 → 26 → 26 → 12 → 12 → 5; fc6 takes 256·5·5 inputs (the code's 5×5 'VALID' conv on the
5×5 map, the same weights). 50,293,440 weights + 20,944 BN parameters = 50,314,384 at 1000
classes: this is the count we follow, not Krizhevsky's 61 M (96-256-384-384-256 convs in two
groups, 6×6 fc6 input) nor torchvision's 61.1 M (64-192-384-256-256, 6×6). HardTanh in place
of the code's ReLU (MINW-Net's block, so that signed low-bit activation quantizers see [−1, 1]);
the max-pool follows the activation as in the code. Convs have no bias (BN follows), nor has
the last FC (its BN follows, as in the code and Models A–D). Inputs need at least 67×67 pixels.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .blocks import linear_block
from .registry import register_model

# (out channels, kernel, stride, padding, max-pool after)
ALEXNET_CONVS = ((64, 11, 4, 0, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (384, 3, 1, 1, False),
                 (256, 3, 1, 1, True))
ALEXNET_FCS = (4096, 4096)


def _pool_out(size: int) -> int:
    """MaxPool 3×3, stride 2, no padding."""
    return (size - 3) // 2 + 1


@register_model("alexnet_bn")
def alexnet_bn(q, *, num_classes, input_shape):
    """AlexNet-BN (authors' layout): convs 64-192-384-384-256, FCs 4096-4096-num_classes, BN everywhere."""
    c, h, w = input_shape
    feats: list[nn.Module] = []
    for i, (cout, k, stride, pad, pool) in enumerate(ALEXNET_CONVS):
        feats += [q.conv(c, cout, k, stride=stride, padding=pad, position="first" if i == 0 else "middle"),
                  nn.BatchNorm2d(cout), nn.Hardtanh()]
        h, w = ((s + 2 * pad - k) // stride + 1 for s in (h, w))
        if pool:
            feats.append(nn.MaxPool2d(3, stride=2))
            h, w = _pool_out(h), _pool_out(w)
        c = cout
        if min(h, w) < 1:
            raise ValueError(f"alexnet_bn: input_shape {tuple(input_shape)} is too small (needs at least 67×67)")
    fin, fc = c * h * w, []
    for fout in ALEXNET_FCS:
        fc.append(linear_block(q, fin, fout))
        fin = fout
    fc += [q.linear(fin, num_classes, position="last"), nn.BatchNorm1d(num_classes)]
    return nn.Sequential(OrderedDict(features=nn.Sequential(*feats), flatten=nn.Flatten(),
                                     classifier=nn.Sequential(*fc)))

"""The paper's CIFAR ConvNet Models A–D (BNN's ConvNet; Chen et al. 2020 Sec. IV, Table II).

Model A (BinaryNet.tf ``BNN_cifar10.py``; 32→30→15→7→3, FC input 512·3·3)::

    QConv 128 (no pad) – BN – HT – QConv 128 – MP2 – BN – HT – QConv 256 – BN – HT –
    QConv 256 – MP2 – BN – HT – QConv 512 – BN – HT – QConv 512 – MP2 – BN – HT –
    QFC 1024 – BN – HT – QFC 1024 – BN – HT – QFC num_classes – BN

B halves every conv's channels; C also halves the FCs to 512; D halves them again to 256.
1-bit weights (10 classes, 3×32×32): 10,352,000 / 4,562,624 / 2,591,424 / 1,802,432 bits =
1.234 / 0.544 / 0.309 / 0.215 MiB, the paper's "parameter capacity" 1.23 / 0.54 / 0.30 / 0.21.
The spatial sizes follow ``input_shape`` (28×28 also ends at 3×3).
"""
from __future__ import annotations

from .blocks import plain_convnet
from .registry import register_model


def _convnet(name: str, width: int, fc: int):
    # (channels, padding, pool); only the first conv is unpadded ('VALID').
    convs = [(width, 0, False), (width, 1, True), (2 * width, 1, False), (2 * width, 1, True),
             (4 * width, 1, False), (4 * width, 1, True)]

    def build(q, *, num_classes, input_shape):
        return plain_convnet(q, input_shape, num_classes, convs=convs, fcs=(fc, fc), head_bn=True, name=name)

    build.__doc__ = f"ConvNet {name}: convs {[c for c, _, _ in convs]}, FCs {fc}-{fc}-num_classes."
    return register_model(name)(build)


convnet_a = _convnet("convnet_a", 128, 1024)
convnet_b = _convnet("convnet_b", 64, 1024)
convnet_c = _convnet("convnet_c", 64, 512)
convnet_d = _convnet("convnet_d", 64, 256)

"""The paper's CIFAR ConvNet Models A–D (BNN's ConvNet; Chen et al. 2020 Sec. IV, Table II).

Model A (BinaryNet.tf ``BNN_cifar10.py``; 32→30→15→7→3, FC input 512·3·3)::

    QConv 128 (no pad) – BN – HT – QConv 128 – MP2 – BN – HT – QConv 256 – BN – HT –
    QConv 256 – MP2 – BN – HT – QConv 512 – BN – HT – QConv 512 – MP2 – BN – HT –
    QFC 1024 – BN – HT – QFC 1024 – BN – HT – QFC num_classes – BN

B halves every conv's channels; C also halves the FCs to 512; D halves them again to 256.
1-bit weights (10 classes, 3×32×32): 10,352,000 / 4,562,624 / 2,591,424 / 1,802,432 bits =
1.234 / 0.544 / 0.309 / 0.215 MiB, the paper's "parameter capacity" 1.23 / 0.54 / 0.30 / 0.21.
The spatial sizes follow ``input_shape`` (28×28 also ends at 3×3).

``width_divisor`` d (a spec's ``model_options``, a power of two ≤ 64) divides every conv channel
count and FC width by d, so A–D keep their relation at reduced capacity (A at d = 2 is C at d = 1).
1-bit weights, 10 classes (the first conv's kernel counts its input channels; the head its inputs)::

    d    3×32×32 (CIFAR):  A / B / C / D                    1×28×28 (Fashion-MNIST):  A / B / C / D
    1    10,352,000 / 4,562,624 / 2,591,424 / 1,802,432    10,349,696 / 4,561,472 / 2,590,272 / 1,801,280
    2     2,591,424 / 1,143,648 /   649,568 /   451,680     2,590,272 / 1,143,072 /   648,992 /   451,104
    4       649,568 /   287,408 /   163,248 /   113,456       648,992 /   287,120 /   162,960 /   113,168
    8       163,248 /    72,600 /    41,240 /    28,632       162,960 /    72,456 /    41,096 /    28,488
"""
from __future__ import annotations

from workers.model_options import ConvNetOptions

from .blocks import plain_convnet
from .registry import register_model


def _convnet(name: str, width: int, fc: int):
    def build(q, *, num_classes, input_shape, width_divisor: int = 1):
        w, f = width // width_divisor, fc // width_divisor
        # (channels, padding, pool); only the first conv is unpadded ('VALID').
        convs = [(w, 0, False), (w, 1, True), (2 * w, 1, False), (2 * w, 1, True), (4 * w, 1, False), (4 * w, 1, True)]
        return plain_convnet(q, input_shape, num_classes, convs=convs, fcs=(f, f), head_bn=True, name=name)

    build.__doc__ = (f"ConvNet {name}: convs {[width, width, 2 * width, 2 * width, 4 * width, 4 * width]}, "
                     f"FCs {fc}-{fc}-num_classes, every width divided by ``width_divisor``.")
    return register_model(name, ConvNetOptions)(build)


convnet_a = _convnet("convnet_a", 128, 1024)
convnet_b = _convnet("convnet_b", 64, 1024)
convnet_c = _convnet("convnet_c", 64, 512)
convnet_d = _convnet("convnet_d", 64, 256)

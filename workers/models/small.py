"""Small quantized ConvNets for CPU runs: ``digits_net`` (1×8×8) and ``fashion_net`` (1×28×28).

digits_net:  QConv 32 – BN – HT – QConv 64 – MP2 – BN – HT – QConv 64 – MP2 – BN – HT – QFC num_classes – BN
             (8→8→4→2; FC input 64·2·2). Trains on scikit-learn's digits in seconds.
fashion_net: QConv 16 – MP2 – BN – HT – QConv 32 – MP2 – BN – HT – QConv 64 – MP2 – BN – HT –
             QFC num_classes – BN (28→14→7→3; FC input 64·3·3). Pooling right after each conv keeps
             it cheap: 1.9 M multiply-adds per image, about 1,560 training images/s on ONE busy
             CPU core at batch 256 (35 s per 55k epoch; 32-64-128 was 3× slower and no more
             accurate after one epoch: 0.81 vs 0.82 test accuracy at W1A1 with AQE).
"""
from __future__ import annotations

from .blocks import plain_convnet
from .registry import register_model


@register_model("digits_net")
def digits_net(q, *, num_classes, input_shape):
    """Conv 32-64-64 (two max-pools) + FC; for 1×8×8 digits."""
    convs = [(32, 1, False), (64, 1, True), (64, 1, True)]
    return plain_convnet(q, input_shape, num_classes, convs=convs, head_bn=True, name="digits_net")


@register_model("fashion_net")
def fashion_net(q, *, num_classes, input_shape):
    """Conv 16-32-64, each followed by a max-pool, + FC; for 1×28×28 Fashion-MNIST."""
    convs = [(16, 1, True), (32, 1, True), (64, 1, True)]
    return plain_convnet(q, input_shape, num_classes, convs=convs, head_bn=True, name="fashion_net")

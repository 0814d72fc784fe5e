"""bitbench's model registry.

    >>> from workers.models import list_models, create_model
    >>> list_models()
    ['alexnet_bn', 'convnet_a', 'convnet_b', 'convnet_c', 'convnet_d', 'densenet100', 'digits_net', 'fashion_net',
     'resnet110', 'resnet18', 'resnet20', 'vgg_small']
    >>> m = create_model("convnet_a", w_bits=1, a_bits=1, estimator="aqe")

Modules: ``registry`` (register/list/create), ``blocks`` (layer factory and blocks),
``convnet`` (Models A–D), ``vgg`` (VGG-Small), ``resnet`` (CIFAR ResNet-20/110, ImageNet ResNet-18),
``densenet`` (DenseNet-BC-100), ``alexnet`` (AlexNet-BN), ``small`` (digits/fashion nets),
``trial`` (the model of one experiment trial).
"""
from . import alexnet, convnet, densenet, resnet, small, vgg  # noqa: F401  (registration)
from .blocks import QuantConfig, conv_block, linear_block, plain_convnet
from .registry import MODELS, create_model, list_models, options_model, register_model
from .trial import trial_model

__all__ = ["MODELS", "QuantConfig", "conv_block", "create_model", "linear_block", "list_models", "options_model",
           "plain_convnet", "register_model", "trial_model"]

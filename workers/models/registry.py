"""The model registry (timm-style): ``register_model``, ``list_models``, ``create_model``.

A registered builder is called as ``builder(q, num_classes=..., input_shape=...)`` with a
:class:`~workers.models.blocks.QuantConfig` ``q`` that makes every quantized layer, so that the
bit widths, the estimator and the first/last-layer rule live in one place.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from estimators.layers import EstimatorArg
from estimators.registry import Registry
from workers.model_options import ModelOptions

from .blocks import QuantConfig

MODELS = Registry("model")
Builder = Callable[..., nn.Module]
_OPTIONS: dict[str, type[ModelOptions]] = {}


def register_model(name: str, options: type[ModelOptions] = ModelOptions) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(q, *, num_classes, input_shape, **options) -> nn.Module`` under
    ``name``; ``options`` is the pydantic model of the keyword options it takes (a spec's ``model_options``)."""
    _OPTIONS[name] = options
    return MODELS.register(name)


def options_model(name: str) -> type[ModelOptions]:
    """The options model of model ``name`` (UnknownNameError for an unknown name)."""
    MODELS.get(name)
    return _OPTIONS[name]


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return MODELS.names()


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    w_bits: int = 1,
    a_bits: int = 1,
    estimator: EstimatorArg = "aqe",
    estimator_params: dict | None = None,
    first_last_float: bool = False,
    options: Mapping[str, Any] | ModelOptions | None = None,
) -> nn.Module:
    """Build model ``name`` for ``input_shape`` = (C, H, W) images and ``num_classes`` outputs.

    Quantized conv/linear layers take ``w_bits`` weights and ``a_bits`` inputs (32 = float; at
    w_bits = a_bits = 32 no estimator is built). The first layer's input, the raw image, is
    always float; ``first_last_float`` also keeps the first layer's weights and the last layer
    (weights and input) float. Unknown names raise ``estimators.UnknownNameError`` listing the
    known ones; an ``input_shape`` too small for the model raises ``ValueError``. ``options`` are the
    model's own (:func:`options_model`, e.g. ConvNets' ``width_divisor``); an unknown or bad one raises
    pydantic's ValidationError (a ValueError).
    """
    builder = MODELS.get(name)
    if not isinstance(options, ModelOptions):
        options = options_model(name).model_validate(dict(options or {}))
    elif not isinstance(options, options_model(name)):
        raise ValueError(f"model {name!r} takes {options_model(name).__name__}, not {type(options).__name__}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}")
    q = QuantConfig(w_bits, a_bits, estimator, estimator_params, first_last_float)
    return builder(q, num_classes=int(num_classes), input_shape=shape, **options.model_dump())

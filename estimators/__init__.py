"""bitbench.estimators: quantizers, gradient estimators and quantized layers (pure torch).

    >>> import estimators
    >>> estimators.list_estimators()[:3]
    ['approx_sign', 'aqe', 'clipped_ste']
    >>> q = estimators.create_estimator("aqe", bits=1, role="activation", backward="alg1")
"""
from . import aqe, dorefa, dsq, ede, ewgs, hwgq, lq_nets, lsq, pact, ste, xnor  # noqa: F401  (registration)
from .base import (
    FLOAT_BITS,
    SUPPORTED_BITS,
    Estimator,
    Param,
    create_estimator,
    estimator_catalog,
    get_estimator_class,
    list_estimators,
    register_estimator,
    validate_estimator_params,
)
from .grids import GRIDS, list_grids
from .layers import QConv2d, QLinear, QuantAct, make_quantizer
from .model_tools import (
    WeightStorage,
    calibrate_activation_stats,
    clip_latent_weights,
    cuda_graphs_capturable,
    level_change_fraction,
    schedule_values,
    set_progress,
    soft_estimators,
    training_forward,
    weight_levels,
    weight_storage,
)
from .quantizers import QUANTIZERS, get_quantizer, levels
from .registry import UnknownNameError

__all__ = [
    "FLOAT_BITS", "GRIDS", "SUPPORTED_BITS", "Estimator", "Param", "QConv2d", "QLinear", "QuantAct", "QUANTIZERS",
    "UnknownNameError", "WeightStorage", "calibrate_activation_stats", "clip_latent_weights", "create_estimator",
    "cuda_graphs_capturable",
    "estimator_catalog",
    "get_estimator_class", "get_quantizer", "level_change_fraction", "levels", "list_estimators", "list_grids",
    "make_quantizer", "register_estimator", "schedule_values", "set_progress", "soft_estimators", "training_forward",
    "validate_estimator_params", "weight_levels", "weight_storage",
]

"""The model of one trial: the spec's model with its options at the trial's bit widths, estimator and first/last-layer
rule.

Shared by the trainer (``workers.train``) and the packed export of a checkpoint
(``workers.packed.export_checkpoint``), which both rebuild exactly this model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .registry import create_model

if TYPE_CHECKING:  # the spec module imports the model registry on first use
    from workers.spec import ExperimentSpec, TrialSpec


def trial_model(spec: ExperimentSpec, trial: TrialSpec, *, num_classes: int,
                input_shape: tuple[int, int, int]) -> nn.Module:
    """``spec.model`` for ``num_classes`` outputs and (C, H, W) ``input_shape`` images at the trial's
    bits and estimator (none for float trials), with the trial's own first/last-layer policy where it
    has one (a named method's), else the spec's."""
    quant = {} if trial.is_float else {"estimator": trial.estimator, "estimator_params": dict(trial.estimator_params)}
    first_last_float = spec.first_last_float if trial.first_last_float is None else trial.first_last_float
    return create_model(spec.model, num_classes=num_classes, input_shape=tuple(input_shape), w_bits=trial.w_bits,
                        a_bits=trial.a_bits, first_last_float=first_last_float, options=spec.model_options, **quant)

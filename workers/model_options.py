"""The options a spec may give its model (``model_options``): one pydantic model per kind of model.

Plain pydantic, no torch, so that a spec is read without the model zoo; each model names its
options model when it registers (:func:`workers.models.register_model`). Unknown options are
refused (``extra="forbid"``: a 422 whose loc names the option).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ModelOptions(BaseModel):
    """Options every model takes: none (a model with options of its own subclasses this)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ConvNetOptions(ModelOptions):
    """Options of the CIFAR ConvNets A–D (:mod:`workers.models.convnet`)."""

    width_divisor: int = Field(
        1, ge=1, le=64, description="divide every conv channel count and FC width by this power of two (1–64), so "
                                    "that A–D keep the paper's relation at reduced capacity; 1: the paper's widths")

    @field_validator("width_divisor")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two (1, 2, 4, …, 64) so that every width divides exactly, got {v}")
        return v


def options_models() -> list[type[ModelOptions]]:
    """The distinct options models, the plain one last (the spec's ``model_options`` union)."""
    return [ConvNetOptions, ModelOptions]

"""``synthetic``: seeded random images of any shape, with learnable labels, for throughput work."""
from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field, PositiveInt, model_validator

from .base import DatasetOptions, RawData, Source

MAX_NUMBERS = 2**30  # generated values in all (4 GiB as float32): a spec must not exhaust a worker


class SyntheticOptions(DatasetOptions):
    """The synthetic data set's options: image shape, class count, split sizes, class separation;
    all the numbers drawn, (n_train + n_val + n_test + num_classes)·C·H·W, at most 2^30."""

    shape: Annotated[list[PositiveInt], Field(min_length=3, max_length=3)] = Field([3, 32, 32], description="[C, H, W]")
    num_classes: int = Field(10, ge=2, description="classes, one random mean image each")
    n_train: int = Field(4096, ge=1, description="training pool, before val_size is taken from it")
    n_val: int = Field(512, ge=0, description="added to the pool; the default val_size")
    n_test: int = Field(1024, ge=1, description="test set size")
    separation: float = Field(0.1, ge=0, allow_inf_nan=False, description="scale of the per-class mean images")

    @model_validator(mode="after")
    def _fits(self):
        n = (self.n_train + self.n_val + self.n_test + self.num_classes) * math.prod(self.shape)
        if n > MAX_NUMBERS:
            raise ValueError(f"(n_train + n_val + n_test + num_classes) × C·H·W = {n} numbers, "
                             f"over the limit of {MAX_NUMBERS}")
        pool = self.n_train + self.n_val
        if isinstance(self.val_size, int) and self.val_size >= pool:
            raise ValueError(f"val_size {self.val_size} leaves no training data in a pool of {pool} (n_train + n_val)")
        return self


def _draw(means: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples with balanced labels in random order: x = means[y] + N(0, 1) noise."""
    y = torch.randperm(n, generator=g) % len(means)
    return means[y] + torch.randn(n, *means.shape[1:], generator=g), y


def build(src: Source) -> RawData:
    """Gaussian noise around one random mean image per class (scaled by ``separation``), drawn
    on the CPU from ``src.seed`` so the data are the same on every device."""
    opts: SyntheticOptions = src.options
    g = torch.Generator().manual_seed(src.seed)
    means = opts.separation * torch.randn(opts.num_classes, *opts.shape, generator=g)
    pool_x, pool_y = _draw(means, opts.n_train + opts.n_val, g)
    test_x, test_y = _draw(means, opts.n_test, g)
    return RawData(pool_x, pool_y, test_x, test_y, num_classes=opts.num_classes, default_val=opts.n_val)

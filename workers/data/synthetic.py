"""``synthetic``: seeded random images of any shape, with learnable labels, for throughput work."""
from __future__ import annotations

import torch

from .base import RawData, Source


def _draw(means: torch.Tensor, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples with balanced labels in random order: x = means[y] + N(0, 1) noise."""
    y = torch.randperm(n, generator=g) % len(means)
    return means[y] + torch.randn(n, *means.shape[1:], generator=g), y


def build(
    src: Source,
    *,
    shape: tuple[int, int, int] | list[int] = (3, 32, 32),
    num_classes: int = 10,
    n_train: int = 4096,
    n_val: int = 512,
    n_test: int = 1024,
    separation: float = 0.1,
) -> RawData:
    """Gaussian noise around one random mean image per class (scaled by ``separation``), drawn
    on the CPU from ``src.seed`` so the data are the same on every device."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) of positive sizes, not {shape}")
    if num_classes < 2 or min(n_train, n_test) < 1 or n_val < 0:
        raise ValueError("synthetic needs num_classes >= 2, n_train >= 1, n_test >= 1, n_val >= 0")
    g = torch.Generator().manual_seed(src.seed)
    means = separation * torch.randn(num_classes, *shape, generator=g)
    pool_x, pool_y = _draw(means, n_train + n_val, g)
    test_x, test_y = _draw(means, n_test, g)
    return RawData(pool_x, pool_y, test_x, test_y, num_classes=num_classes, default_val=n_val)

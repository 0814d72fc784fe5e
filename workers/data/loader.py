"""Batches from tensors that stay on their device, with shuffling and augmentation as tensor ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rng_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Random numbers are drawn where the generator lives (or on the data's device without one)."""
    return generator.device if generator is not None else fallback


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad (N, C, H, W) with ``padding`` zeros on every side and cut an H×W window at an independent
    random offset per sample: each output is its input shifted by up to ``padding`` pixels in each
    direction, with zeros shifted in. One gather from a view of all windows, no loop over samples."""
    if padding <= 0:
        return x
    n, _, h, w = x.shape
    dev = _rng_device(generator, x.device)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=dev).to(x.device)
    windows = F.pad(x, (padding,) * 4).unfold(2, h, 1).unfold(3, w, 1)  # (N, C, 2p+1, 2p+1, H, W)
    return windows[torch.arange(n, device=x.device), :, dy, dx]


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each sample of (N, C, H, W) left-right with probability ½ (independently)."""
    dev = _rng_device(generator, x.device)
    mask = torch.rand(x.shape[0], generator=generator, device=dev).to(x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class DeviceLoader:
    """Iterate ``(x, y)`` batches of ``batch_size`` from tensors that stay on their device.

    Each pass draws a fresh order from ``generator`` when ``shuffle`` (every sample exactly once
    per pass; the last batch is short unless ``drop_last``), then per batch a random crop with
    ``crop_padding`` zero padding and a random horizontal ``flip``. The same generator state
    gives the same batches. ``DeviceLoader(x, y, b, shuffle=True, **splits.augment)`` applies
    a data set's augmentation.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, not {crop_padding}")
        if (crop_padding or flip) and x.dim() != 4:
            raise ValueError(f"augmentation needs (N, C, H, W) inputs, got shape {tuple(x.shape)}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.generator, self.drop_last = shuffle, generator, drop_last
        self.crop_padding, self.flip = crop_padding, flip

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        dev = _rng_device(self.generator, self.x.device)
        return torch.randperm(len(self.y), generator=self.generator, device=dev).to(self.x.device)

    def _augment(self, xb: torch.Tensor) -> torch.Tensor:
        xb = random_crop(xb, self.crop_padding, self.generator)
        return random_flip(xb, self.generator) if self.flip else xb

    def __iter__(self):
        order = self._order()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            sl = slice(start, start + self.batch_size)
            idx = sl if order is None else order[sl]
            yield self._augment(self.x[idx]), self.y[idx]

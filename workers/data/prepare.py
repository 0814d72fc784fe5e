"""Turn a builder's RawData into DataSplits: fixed (stratified) split, device move, normalisation."""
from __future__ import annotations

import numpy as np
import torch

from .base import DataSplits, RawData


def held_out_count(size: int | float, n: int) -> int:
    """Resolve a held-out size against a pool of ``n``: an int is a count, a float in (0, 1) a
    fraction (rounded up, like scikit-learn). At least one sample must stay in the pool."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ValueError(f"val_size must be an int count or a float fraction, not {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size < 1.0:
            raise ValueError(f"a fractional val_size must be in [0, 1), not {size}")
        size = int(np.ceil(size * n))
    if not 0 <= size < n:
        raise ValueError(f"val_size {size} leaves no training data in a pool of {n}")
    return size


def _can_stratify(y: np.ndarray, n_out: int) -> bool:
    counts = np.bincount(y)
    k = int((counts > 0).sum())
    return counts[counts > 0].min() >= 2 and n_out >= k and len(y) - n_out >= k


def stratified_counts(counts: np.ndarray, n_out: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class held-out counts summing to ``n_out``, proportional to ``counts``: each class gets
    floor(n_out·c/n), the rest go one each to the largest remainders (ties in seeded random order).
    The rest is the sum of the remainders, each < 1, so only classes with a remainder get one, and
    none of those is already at its size."""
    exact = n_out * counts / counts.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.lexsort((rng.random(len(counts)), out - exact))  # largest remainder first, ties shuffled
    out[order[:n_out - int(out.sum())]] += 1
    return out


def split_indices(y: torch.Tensor, n_out: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(y))`` into (kept, held out) with ``n_out`` held out, seeded by
    ``split_seed`` only; both sorted. Stratified (:func:`stratified_counts`, then a seeded
    permutation within each class) where every class can appear on both sides, else a seeded
    permutation of all."""
    idx = np.arange(len(y))
    if n_out == 0:
        return idx, idx[:0]
    labels = y.numpy()
    rng = np.random.default_rng(split_seed)
    if not _can_stratify(labels, n_out):
        out = rng.permutation(len(labels))[:n_out]
    else:
        per_class = stratified_counts(np.bincount(labels), n_out, rng)
        out = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k]
                              for c, k in enumerate(per_class) if k])
    held = np.zeros(len(labels), dtype=bool)
    held[out] = True
    return idx[~held], idx[held]


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of (N, C, H, W), accumulated in float64 by chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for part in x.split(chunk):
        part = part.double()
        total += part.sum((0, 2, 3))
        squares += part.square().sum((0, 2, 3))
    count = x.numel() / x.shape[1]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return mean, std.clamp_min(1e-8)


def _to_float(x: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """Move first (raw dtypes are smaller), then convert to float32 in [0, 1] on the device."""
    return (x.to(device).float() / scale).contiguous()


def split_pool(pool_y: torch.Tensor, n_val: int, split_seed: int,
               train_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into a pool labelled ``pool_y``: ``n_val`` held out
    (:func:`split_indices`), then a fixed stratified subset of ``train_size`` kept for training
    (same for every seed) when given."""
    kept, held = (torch.from_numpy(i) for i in split_indices(pool_y, n_val, split_seed))
    if train_size is not None and train_size < len(kept):
        if train_size < 1:
            raise ValueError(f"train_size must be at least 1, not {train_size}")
        sub, _ = split_indices(pool_y[kept], len(kept) - train_size, split_seed)
        kept = kept[torch.from_numpy(sub)]
    return kept, held


def make_splits(name: str, raw: RawData, n_val: int, split_seed: int, device: torch.device,
                train_size: int | None = None) -> DataSplits:
    """Split the pool (:func:`split_pool`), move everything to ``device`` and normalise with the
    train split's stats."""
    kept, held = split_pool(raw.pool_y, n_val, split_seed, train_size)
    xs = [_to_float(raw.pool_x[i], raw.scale, device) for i in (kept, held)]
    xs.append(_to_float(raw.test_x, raw.scale, device))
    mean, std = channel_stats(xs[0])
    shape = (1, -1, 1, 1)
    for x in xs:
        x.sub_(mean.float().view(shape)).div_(std.float().view(shape))
    ys = [raw.pool_y[kept], raw.pool_y[held], raw.test_y]
    ys = [y.to(device=device, dtype=torch.int64) for y in ys]
    return DataSplits(
        name=name,
        train_x=xs[0], train_y=ys[0], val_x=xs[1], val_y=ys[1], test_x=xs[2], test_y=ys[2],
        num_classes=raw.num_classes,
        input_shape=tuple(xs[0].shape[1:]),
        augment=dict(raw.augment),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )

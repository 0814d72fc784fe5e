"""``digits``: scikit-learn's 1,797 real 8×8 handwritten digits (shipped with the package)."""
from __future__ import annotations

import torch
from sklearn.datasets import load_digits

from .base import RawData, Source
from .prepare import held_out_count, split_indices

TEST_FRACTION = 0.2  # of all 1,797 images
VAL_FRACTION = 0.25  # of the rest: 60/20/20 train/val/test


def build(src: Source) -> RawData:
    """Images 0..16 as (1797, 1, 8, 8); a stratified 20% test split fixed by ``src.split_seed``
    (never by ``src.seed``), the default validation split a further 20% of the whole."""
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).to(torch.uint8)[:, None]
    y = torch.from_numpy(bunch.target).long()
    n_test = held_out_count(TEST_FRACTION, len(y))
    pool, test = (torch.from_numpy(i) for i in split_indices(y, n_test, src.split_seed))
    return RawData(x[pool], y[pool], x[test], y[test], num_classes=10, scale=16.0,
                   default_val=VAL_FRACTION)

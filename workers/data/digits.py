"""``digits``: scikit-learn's 1,797 real 8×8 handwritten digits (shipped with the package).

Read straight from the package's ``datasets/data/digits.csv.gz`` (64 pixel values 0..16, then the
label, per row) without importing scikit-learn, whose import (scipy included) would cost every
worker process ≈0.8 s.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .base import RawData, Source
from .prepare import held_out_count, split_indices

TEST_FRACTION = 0.2  # of all 1,797 images
VAL_FRACTION = 0.25  # of the rest: 60/20/20 train/val/test


def digits_file() -> Path:
    """Where the installed scikit-learn keeps the digits CSV; a clear error if it does not."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the digits data set ships with scikit-learn: pip install scikit-learn "
                                f"(looked for {path or 'sklearn/datasets/data/digits.csv.gz'})")
    return path


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8), labels int64 (1797,)) from :func:`digits_file`."""
    with gzip.open(digits_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 8, 8).astype(np.uint8), table[:, -1]


def build(src: Source) -> RawData:
    """Images 0..16 as (1797, 1, 8, 8); a stratified 20% test split fixed by ``src.split_seed``
    (never by ``src.seed``), the default validation split a further 20% of the whole."""
    images, labels = read_digits()
    x = torch.from_numpy(images)[:, None]
    y = torch.from_numpy(labels)
    n_test = held_out_count(TEST_FRACTION, len(y))
    pool, test = (torch.from_numpy(i) for i in split_indices(y, n_test, src.split_seed))
    return RawData(x[pool], y[pool], x[test], y[test], num_classes=10, scale=16.0,
                   default_val=VAL_FRACTION)

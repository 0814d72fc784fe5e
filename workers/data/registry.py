"""The data set registry and ``load_dataset``, the one entry point."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from estimators.registry import Registry, UnknownNameError

from . import digits, folder, synthetic, vision
from .base import DataSplits, Source
from .prepare import held_out_count, make_splits

SPLIT_SEED = 0  # fixed: every seed of a sweep sees the same train/validation/test split
DEFAULT_DATA_DIR = Path("~/.cache/bitbench/data")

DATASETS = Registry("dataset")
for _name, _build in {
    "cifar10": vision.build_cifar10,
    "cifar100": vision.build_cifar100,
    "digits": digits.build,
    "fashion_mnist": vision.build_fashion_mnist,
    "imagenet": folder.build_imagenet,
    "mnist": vision.build_mnist,
    "synthetic": synthetic.build,
}.items():
    DATASETS.register(_name)(_build)


def list_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return DATASETS.names()


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else $BITBENCH_DATA_DIR, else ~/.cache/bitbench/data (user-expanded)."""
    chosen = data_dir if data_dir is not None else os.environ.get("BITBENCH_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def download_allowed(download: bool = False) -> bool:
    """``download``, or $BITBENCH_ALLOW_DOWNLOAD set to 1/true/yes."""
    env = os.environ.get("BITBENCH_ALLOW_DOWNLOAD", "").strip().lower()
    return bool(download) or env in ("1", "true", "yes")


def _check_options(name: str, build, options: dict) -> None:
    params = inspect.signature(build).parameters.values()
    known = sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UnknownNameError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for data set {name!r}; "
            f"known: {', '.join(known) or '(none)'}"
        )


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    val_size: int | float | None = None,
    split_seed: int = SPLIT_SEED,
    train_size: int | None = None,
    **options,
) -> DataSplits:
    """Load data set ``name`` as normalised train/validation/test tensors on ``device``.

    ``val_size``: validation samples taken from the training pool, a count or a fraction of the
    pool (default per data set: 5,000 for MNIST-likes and CIFAR, 20% of the whole for digits,
    ``n_val`` for synthetic; 0 for none). The split is stratified and fixed by ``split_seed``;
    ``seed`` only seeds generated data (synthetic), so a sweep over seeds varies only
    initialisation and order. ``train_size`` keeps a fixed stratified subset of the training
    split (for budgeted studies). ``options`` are the data set's own (synthetic: shape, num_classes,
    n_train, n_val, n_test, separation). Raises UnknownNameError for an unknown name or option,
    DatasetMissingError when the files are not on disk (see ``resolve_data_dir``) and cannot be
    downloaded (``download`` or $BITBENCH_ALLOW_DOWNLOAD=1).
    """
    build = DATASETS.get(name)
    _check_options(name, build, options)
    src = Source(resolve_data_dir(data_dir), download_allowed(download), seed, split_seed)
    raw = build(src, **options)
    size = raw.default_val if val_size is None else val_size
    n_val = held_out_count(size, len(raw.pool_y))
    if isinstance(raw, folder.FolderData):  # image files, streamed: a FolderSplits
        return raw.make_splits(name, n_val, split_seed, torch.device(device), train_size)
    return make_splits(name, raw, n_val, split_seed, torch.device(device), train_size)

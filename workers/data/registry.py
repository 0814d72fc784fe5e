"""The data set registry and ``load_dataset``, the one entry point."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from estimators.registry import Registry, UnknownNameError

from . import digits, folder, synthetic, vision
from .base import DatasetOptions, DataSplits, RawData, Source
from .prepare import held_out_count, make_splits

DEFAULT_DATA_DIR = Path("~/.cache/bitbench/data")


def _nothing(options: DatasetOptions) -> list[str]:
    return []


@dataclass(frozen=True)
class DataSet:
    """A registered data set: its builder, the options a spec may set (a pydantic model), the files
    it reads under the data directory (``required_files(options)``: paths relative to it, ``[.gz]``
    where either form will do; none for bundled or generated data) and, where known without reading
    them, its training pool's size and default validation share (for a dry run's time estimate)."""

    build: Callable[[Source], RawData]
    options: type[DatasetOptions] = DatasetOptions
    required_files: Callable[[DatasetOptions], list[str]] = _nothing
    pool_size: Callable[[DatasetOptions], int] | None = None
    default_val: int | float | Callable[[DatasetOptions], int] = 5000


def _fixed(n: int) -> Callable[[DatasetOptions], int]:
    return lambda options: n


DATASETS = Registry("dataset")
for _name, _entry in {
    "cifar10": DataSet(vision.build_cifar10, required_files=vision.cifar_files("cifar10"),
                       pool_size=_fixed(vision.POOL_SIZES["cifar10"]), default_val=vision.CIFAR_VAL),
    "cifar100": DataSet(vision.build_cifar100, required_files=vision.cifar_files("cifar100"),
                        pool_size=_fixed(vision.POOL_SIZES["cifar100"]), default_val=vision.CIFAR_VAL),
    "digits": DataSet(digits.build),
    "fashion_mnist": DataSet(vision.build_fashion_mnist, required_files=vision.mnist_files("FashionMNIST"),
                             pool_size=_fixed(vision.POOL_SIZES["fashion_mnist"]), default_val=vision.MNIST_VAL),
    "imagenet": DataSet(folder.build_imagenet, folder.ImagenetOptions,
                        required_files=lambda o: ["imagenet/train/<class>/<image>", "imagenet/val/<class>/<image>"],
                        default_val=folder.IMAGENET_VAL),
    "mnist": DataSet(vision.build_mnist, required_files=vision.mnist_files("MNIST"),
                     pool_size=_fixed(vision.POOL_SIZES["mnist"]), default_val=vision.MNIST_VAL),
    "synthetic": DataSet(synthetic.build, synthetic.SyntheticOptions, pool_size=lambda o: o.n_train + o.n_val,
                         default_val=lambda o: o.n_val),
}.items():
    DATASETS.register(_name)(_entry)


def list_datasets() -> list[str]:
    """The registered data set names, sorted."""
    return DATASETS.names()


def options_model(name: str) -> type[DatasetOptions]:
    """The options model of data set ``name`` (UnknownNameError for an unknown name)."""
    return DATASETS.get(name).options


def options_models() -> list[type[DatasetOptions]]:
    """The distinct options models of the registered data sets, in name order."""
    return list(dict.fromkeys(options_model(n) for n in list_datasets()))


def required_files(name: str, options: DatasetOptions) -> list[str]:
    """The files data set ``name`` reads, relative to the data directory (:class:`DataSet`)."""
    return DATASETS.get(name).required_files(options)


def train_images(name: str, options: DatasetOptions) -> int | None:
    """Training images per epoch of data set ``name`` with ``options`` (its pool less validation, or
    ``train_size``), or None where the pool's size is not known without reading the data."""
    entry = DATASETS.get(name)
    if entry.pool_size is None:
        return None
    pool = entry.pool_size(options)
    default = entry.default_val(options) if callable(entry.default_val) else entry.default_val
    n = pool - held_out_count(default if options.val_size is None else options.val_size, pool)
    return n if options.train_size is None else min(n, options.train_size)


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir``, else $BITBENCH_DATA_DIR, else ~/.cache/bitbench/data (user-expanded)."""
    chosen = data_dir if data_dir is not None else os.environ.get("BITBENCH_DATA_DIR") or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def download_allowed(download: bool = False) -> bool:
    """``download``, or $BITBENCH_ALLOW_DOWNLOAD set to 1/true/yes."""
    env = os.environ.get("BITBENCH_ALLOW_DOWNLOAD", "").strip().lower()
    return bool(download) or env in ("1", "true", "yes")


def parse_options(name: str, options: dict[str, Any]) -> DatasetOptions:
    """``options`` validated by data set ``name``'s model: UnknownNameError (listing the known
    options) for an unknown one, pydantic's ValidationError (a ValueError) for a bad value."""
    model = options_model(name)
    unknown = sorted(set(options) - set(model.model_fields))
    if unknown:
        raise UnknownNameError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for data set {name!r}; "
            f"known: {', '.join(sorted(model.model_fields))}"
        )
    return model.model_validate(options)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    download: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **options,
) -> DataSplits:
    """Load data set ``name`` as normalised train/validation/test tensors on ``device``.

    ``options`` are those of the data set's options model (:func:`options_model`): for every data
    set ``val_size`` (validation samples taken from the training pool, a count or a fraction),
    ``train_size`` (a fixed stratified subset of the training split) and ``split_seed``; for
    synthetic also shape, num_classes, n_train, n_val, n_test, separation. The split is
    stratified and fixed by ``split_seed``; ``seed`` only seeds generated data (synthetic), so a
    sweep over seeds varies only initialisation and order. ``data_dir`` and ``download`` are for
    programmatic callers (a spec cannot set them). Raises UnknownNameError for an unknown name or
    option, ValueError for a bad option value, DatasetMissingError when the files are not on disk
    (see ``resolve_data_dir``) and cannot be downloaded (``download`` or $BITBENCH_ALLOW_DOWNLOAD=1).
    """
    build = DATASETS.get(name).build
    opts = parse_options(name, options)
    raw = build(Source(resolve_data_dir(data_dir), download_allowed(download), seed, opts))
    size = raw.default_val if opts.val_size is None else opts.val_size
    n_val = held_out_count(size, len(raw.pool_y))
    if isinstance(raw, folder.FolderData):  # image files, streamed: a FolderSplits
        return raw.make_splits(name, n_val, opts.split_seed, torch.device(device), opts.train_size)
    return make_splits(name, raw, n_val, opts.split_seed, torch.device(device), opts.train_size)

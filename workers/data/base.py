"""Types shared by the dataset modules: the error, the options every data set takes, what a
builder gets and returns, what a caller gets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from .loader import DeviceLoader

SPLIT_SEED = 0  # fixed: every seed of a sweep sees the same train/validation/test split
MAX_SEED = 2**32 - 1


class DatasetMissingError(FileNotFoundError):
    """A data set is not on disk where it was looked for; the message names the paths and the remedies."""


def missing(name: str, looked: list[Path], files: list[str], remedies: list[str],
            cause: str = "") -> DatasetMissingError:
    """Build the DatasetMissingError for ``name``: the folders looked in and the files expected
    there, then how to provide the data (and why a download failed, if one did)."""
    where = "\n".join(f"  - {p}" for p in looked)
    how = "\n".join(f"  - {r}" for r in remedies)
    extra = f"\n{cause}" if cause else ""
    return DatasetMissingError(
        f"data set {name!r} not found; looked in:\n{where}\nfor the files: {', '.join(files)}\n"
        f"provide it by one of:\n{how}{extra}"
    )


class DatasetOptions(BaseModel):
    """Options every data set takes: how its training pool is split into train and validation
    (applied by load_dataset after the builder; a data set with options of its own subclasses
    this). Where the data live and whether they may be downloaded are the server's settings
    (BITBENCH_DATA_DIR, BITBENCH_ALLOW_DOWNLOAD), never options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    val_size: Annotated[StrictInt, Field(ge=0)] | Annotated[StrictFloat, Field(ge=0, lt=1)] | None = Field(
        None, description="validation samples taken from the training pool, a count or a fraction of it; null: the "
                          "data set's default (5,000 for MNIST-likes and CIFAR, 20% of all digits, synthetic's n_val)")
    train_size: int | None = Field(
        None, ge=1, description="keep a fixed stratified subset of this many training samples (the same for every "
                                "seed); default all")
    split_seed: int = Field(SPLIT_SEED, ge=0, le=MAX_SEED,
                            description="seeds the stratified train/validation (and digits' test) split")


@dataclass(frozen=True)
class Source:
    """Where and how a builder gets its data: the resolved data directory, whether it may
    download, the generation seed (synthetic data) and the validated options (the split seed
    for real data, a synthetic data set's shape and sizes)."""

    root: Path
    download: bool
    seed: int
    options: DatasetOptions

    @property
    def split_seed(self) -> int:
        return self.options.split_seed


@dataclass
class RawData:
    """What a builder returns: a training pool (to be split into train/validation) and a test
    set, x as (N, C, H, W) in any numeric dtype with values in [0, scale], y integer labels."""

    pool_x: torch.Tensor
    pool_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    scale: float = 1.0
    default_val: int | float = 5000  # count, or fraction of the pool
    augment: dict = field(default_factory=dict)


@dataclass(repr=False)
class DataSplits:
    """Train/validation/test tensors ready for training, all on one device.

    x: float32 (N, C, H, W), normalised per channel with the train split's mean and std
    (``mean``/``std`` are those statistics in [0, 1] pixel units); y: int64 labels.
    ``augment`` holds DeviceLoader keyword arguments for the train split (``{}`` when none).
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: dict
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> DeviceLoader:
        """A DeviceLoader over ``split`` ("train", "val" or "test"): the train split shuffled and
        augmented with ``self.augment``, the others in order and unaugmented."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        train = split == "train"
        augment = self.augment if train else {}
        return DeviceLoader(
            x, y, batch_size, shuffle=train, generator=generator, drop_last=drop_last, **augment
        )

    def head(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples of ``split`` in order, unaugmented: (x, y) on the device."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        return getattr(self, f"{split}_x")[:n], getattr(self, f"{split}_y")[:n]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s + '_y'))}" for s in ("train", "val", "test"))
        return (
            f"DataSplits({self.name!r}, {sizes}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, device={self.train_x.device}, augment={self.augment})"
        )

"""``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: torchvision's on-disk formats under the
data directory, Debian's ``dataset-fashion-mnist`` as a fallback, download only when allowed."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .base import RawData, Source, missing
from .idx import find_idx, read_idx

# Debian's dataset-fashion-mnist installs the four gzipped IDX files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_VAL = 5000
CIFAR_VAL = 5000  # the paper's 45k/5k train/validation split
CIFAR_AUGMENT = {"crop_padding": 4, "flip": True}
IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
#: (folder, files) of torchvision's python-version CIFAR batches (the same as torchvision's lists; a test holds them)
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
}
#: the training pools, before validation is taken from them
POOL_SIZES = {"mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000, "cifar100": 50_000}
_ENV_HINTS = [
    "set BITBENCH_DATA_DIR (or pass data_dir=...) to a directory that holds it",
    "pass download=True (or set BITBENCH_ALLOW_DOWNLOAD=1) to fetch it from the internet",
]


def _tv():
    """torchvision.datasets, imported on first use (it costs seconds in every Ray worker)."""
    from torchvision import datasets

    return datasets


def _fetch(cls: type, root: Path) -> None:
    """Download ``cls``'s files into ``root`` with torchvision (needs the internet)."""
    cls(str(root), train=True, download=True)


def _ensure(name: str, cls: type, src: Source, present: Callable[[], bool],
            looked: list[Path], files: list[str], hints: list[str]) -> None:
    """Return once ``present()``; download first where allowed; else raise DatasetMissingError."""
    if present():
        return
    cause = ""
    if src.download:
        try:
            _fetch(cls, src.root)
        except Exception as err:  # network, checksum, disk: all mean "still missing"
            cause = f"download into {src.root} failed: {type(err).__name__}: {err}"
        if present():
            return
    raise missing(name, looked, files, [*hints, *_ENV_HINTS], cause)


# --- MNIST and Fashion-MNIST -------------------------------------------------------------------

def _idx_dir_complete(folder: Path) -> bool:
    return all(find_idx(folder, f) is not None for f in IDX_FILES)


def _read_idx_dir(folder: Path) -> list[torch.Tensor]:
    """The four IDX files of ``folder`` (raw or gzipped) as tensors, in IDX_FILES order."""
    return [torch.from_numpy(read_idx(find_idx(folder, f))) for f in IDX_FILES]


def _read_torchvision(cls: type, root: Path) -> list[torch.Tensor]:
    """Load torchvision's layout ``root/<Class>/raw/`` (uncompressed files) with torchvision."""
    train, test = (cls(str(root), train=t, download=False) for t in (True, False))
    return [train.data, train.targets, test.data, test.targets]


def _has_uncompressed(folder: Path) -> bool:
    return all((folder / f).is_file() for f in IDX_FILES)


def _mnist_like(cls: type, name: str, fallbacks: tuple[Path, ...], hints: list[str],
                src: Source) -> RawData:
    """Look in ``data_dir/<Class>/raw`` (torchvision's layout; gzipped files are read too), then
    in ``fallbacks``, then download if allowed. 60k train pool (5k validation), 10k test."""
    raw = src.root / cls.__name__ / "raw"
    folders = (raw, *fallbacks)
    _ensure(name, cls, src, lambda: any(map(_idx_dir_complete, folders)), list(folders),
            [f"{f}[.gz]" for f in IDX_FILES], hints)
    if _has_uncompressed(raw):
        tensors = _read_torchvision(cls, src.root)
    else:
        tensors = _read_idx_dir(next(d for d in folders if _idx_dir_complete(d)))
    train_x, train_y, test_x, test_y = tensors
    return RawData(train_x[:, None], train_y.long(), test_x[:, None], test_y.long(),
                   num_classes=10, scale=255.0, default_val=MNIST_VAL)


def build_mnist(src: Source) -> RawData:
    """MNIST from ``data_dir/MNIST/raw``."""
    hints = [f"put the four IDX files in {src.root / 'MNIST' / 'raw'}"]
    return _mnist_like(_tv().MNIST, "mnist", (), hints, src)


def build_fashion_mnist(src: Source) -> RawData:
    """Fashion-MNIST from ``data_dir/FashionMNIST/raw``, else Debian's DEBIAN_FASHION_MNIST."""
    hints = [
        f"put the four IDX files in {src.root / 'FashionMNIST' / 'raw'}",
        f"apt-get install dataset-fashion-mnist (installs them in {DEBIAN_FASHION_MNIST})",
    ]
    return _mnist_like(_tv().FashionMNIST, "fashion_mnist", (DEBIAN_FASHION_MNIST,), hints, src)


# --- CIFAR-10 and CIFAR-100 --------------------------------------------------------------------

def _cifar_files(cls: type) -> list[str]:
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _trusting(cls: type) -> type:
    """``cls`` reading local files without MD5 checks (torchvision checks MD5s on every load,
    which rejects any file but the published ones and re-reads ~180 MB each time)."""
    unchecked = {
        "train_list": [[f, None] for f, _ in cls.train_list],
        "test_list": [[f, None] for f, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    }
    return type(f"Local{cls.__name__}", (cls,), unchecked)


def _cifar_images(ds) -> torch.Tensor:
    """torchvision keeps CIFAR as (N, H, W, C) uint8; return (N, C, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))


def _cifar(cls: type, name: str, num_classes: int, src: Source) -> RawData:
    """Pickled batches in ``data_dir/<base_folder>/``: 50k train pool (5k validation), 10k test,
    random crop (padding 4) and flip for training."""
    folder = src.root / cls.base_folder
    files = _cifar_files(cls)
    _ensure(name, cls, src, lambda: all((folder / f).is_file() for f in files), [folder], files,
            [f"put the python-version batches in {folder}"])
    local = _trusting(cls)
    train, test = (local(str(src.root), train=t, download=False) for t in (True, False))
    return RawData(
        _cifar_images(train), torch.tensor(train.targets), _cifar_images(test),
        torch.tensor(test.targets), num_classes=num_classes, scale=255.0,
        default_val=CIFAR_VAL, augment=dict(CIFAR_AUGMENT),
    )


def build_cifar10(src: Source) -> RawData:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py/``."""
    return _cifar(_tv().CIFAR10, "cifar10", 10, src)


def build_cifar100(src: Source) -> RawData:
    """CIFAR-100 (fine labels) from ``data_dir/cifar-100-python/``."""
    return _cifar(_tv().CIFAR100, "cifar100", 100, src)


# --- what each needs on disk (a dry run lists it) ------------------------------------------------

def mnist_files(folder: str) -> Callable[[object], list[str]]:
    """``required_files(options)`` of an MNIST-like set in ``data_dir/<folder>/raw`` (gzipped or not)."""
    return lambda options: [f"{folder}/raw/{f}[.gz]" for f in IDX_FILES]


def cifar_files(name: str) -> Callable[[object], list[str]]:
    """``required_files(options)`` of CIFAR ``name``: its batches under the data directory."""
    folder, files = CIFAR_FILES[name]
    return lambda options: [f"{folder}/{f}" for f in files]

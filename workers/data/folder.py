"""``imagenet``: ILSVRC-2012 in class folders, streamed from disk (it does not fit on a device).

Layout (torchvision's ``ImageFolder``)::

    <data_dir>/imagenet/train/<class>/*.JPEG      the training pool: train and validation splits
    <data_dir>/imagenet/val/<class>/*.JPEG        the test split (the paper's numbers are on val/)

Classes are train/'s folder names in sorted order; val/ may hold a subset of them. The validation
split (default 1 % of train/, stratified, fixed by the split seed like every data set) is
carved out of train/ so that model selection never sees val/.

Views (the paper's AlexNet set-up: "random-size crop resized to 256×256, then a random 224×224
crop", flip; test: 224 centre crop)::

    train:      random-size crop (area U(0.08, 1), aspect log-U(3/4, 4/3); Szegedy et al. 2015)
                resized to resize × resize, random image_size crop, horizontal flip with p ½
    val, test:  shorter side resized to resize, centre image_size crop

then normalised per channel with ImageNet's usual mean and std (not measured: a pass over 1.28 M
images per trial would cost more than an epoch). ``resize = image_size`` trains on torchvision's
plain RandomResizedCrop (and tests on the centre square of the whole image).

Decoding runs in ``workers`` DataLoader processes (default: the trial's CPUs, i.e. torch's
thread count when the data set is loaded: ``run_trial`` sets it from ``resources.cpu``) that hand
uint8 tensors to the trainer, which moves them to the device and normalises them there.

Determinism: each pass draws one 62-bit seed from the loader's generator (the trainer's,
checkpointed with the trial); the order is a permutation seeded by it and each image's crop and
flip come from its own generator seeded by (pass seed, image index). The batches are therefore
the same for any number of workers and after a resume.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from .base import DatasetOptions, Source, missing
from .prepare import split_pool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_VAL = 0.01  # fraction of train/ held out for validation
SCALE = (0.08, 1.0)  # random-size crop: fraction of the image's area
RATIO = (3 / 4, 4 / 3)  # ... and range of its aspect ratio (width / height)
SPLITS = ("train", "val", "test")


# -- views ---------------------------------------------------------------------------------------
def random_size_box(width: int, height: int, rng: np.random.Generator, tries: int = 10) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of area fraction U(SCALE) and aspect ratio
    log-uniform in RATIO that fits the image; after ``tries`` misses, the largest centred crop
    whose aspect ratio is within RATIO."""
    area = width * height
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(tries):
        target, aspect = area * rng.uniform(*SCALE), math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = min(max(width / height, RATIO[0]), RATIO[1])
    w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
    return (height - h) // 2, (width - w) // 2, h, w


def train_view(img, rng: np.random.Generator, *, image_size: int, resize: int) -> torch.Tensor:
    """Random-size crop → resize × resize → random image_size crop → flip (p ½); uint8 (3, S, S)."""
    from torchvision.transforms import functional as TF

    top, left, h, w = random_size_box(img.width, img.height, rng)
    img = TF.resized_crop(img, top, left, h, w, [resize, resize])
    dy, dx = (int(v) for v in rng.integers(0, resize - image_size + 1, size=2))
    img = TF.crop(img, dy, dx, image_size, image_size)
    if rng.random() < 0.5:
        img = TF.hflip(img)
    return TF.pil_to_tensor(img)


def eval_view(img, rng=None, *, image_size: int, resize: int) -> torch.Tensor:
    """Shorter side → resize, centre image_size crop; uint8 (3, S, S). ``rng`` is unused."""
    from torchvision.transforms import functional as TF

    return TF.pil_to_tensor(TF.center_crop(TF.resize(img, resize), [image_size, image_size]))


def load_rgb(path: str):
    """The image at ``path`` as an RGB PIL image (greyscale and CMYK files are converted)."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class Images(torch.utils.data.Dataset):
    """Image files with labels; item i = (view(image i, rng(seed, i)), label i).

    Paths are one fixed-width numpy bytes array, not a list of str: forked workers then share
    the pages instead of copying every object whose reference count they touch."""

    def __init__(self, paths: np.ndarray, labels: torch.Tensor, view: Callable, seed: int = 0):
        self.paths, self.labels, self.view, self.seed = paths, labels, view, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, int(i)])
        return self.view(load_rgb(os.fsdecode(self.paths[i])), rng), int(self.labels[i])


# -- loader ----------------------------------------------------------------------------------------
class FolderLoader:
    """Iterate ``(x, y)`` batches on ``device`` from image files: x float32 (B, 3, S, S)
    normalised with ``mean``/``std``, y int64. The same contract as :class:`DeviceLoader`:
    every sample once per pass, shuffled (from ``generator``) when ``shuffle``, the last batch
    short unless ``drop_last``. Batches are decoded by ``workers`` processes (0: in this one)."""

    def __init__(self, paths: np.ndarray, labels: torch.Tensor, view: Callable, batch_size: int, *,
                 shuffle: bool, generator: torch.Generator | None = None, drop_last: bool = False,
                 workers: int = 0, device: torch.device = torch.device("cpu"),
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.paths, self.labels, self.view, self.batch_size = paths, labels, view, batch_size
        self.shuffle, self.generator, self.drop_last = shuffle, generator, drop_last
        self.workers, self.device = workers, torch.device(device)
        shape = (1, -1, 1, 1)
        self.shift = torch.tensor(mean, device=self.device).view(shape) * 255
        self.scale = 1 / (torch.tensor(std, device=self.device).view(shape) * 255)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _seed(self) -> int:
        """One draw from the generator (or torch's global one) per shuffled pass."""
        g = self.generator
        return int(torch.randint(0, 2**62, (), generator=g, device=g.device if g is not None else "cpu").item())

    def __iter__(self):
        seed = self._seed() if self.shuffle else 0
        g = torch.Generator().manual_seed(seed)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        b = self.batch_size
        batches = [order[s:s + b].tolist() for s in range(0, len(self) * b, b)]
        cuda = self.device.type == "cuda"
        data = torch.utils.data.DataLoader(Images(self.paths, self.labels, self.view, seed), batch_sampler=batches,
                                           num_workers=self.workers, pin_memory=cuda, generator=g)
        for xb, yb in data:
            xb = xb.to(self.device, non_blocking=cuda).float().sub_(self.shift).mul_(self.scale)
            yield xb, yb.to(self.device, non_blocking=cuda)


# -- splits ----------------------------------------------------------------------------------------
@dataclass(repr=False)
class FolderSplits:
    """Train/validation/test splits of image files, with :class:`DataSplits`'s interface for the
    trainer (``loader``, ``head``, ``*_y``, ``num_classes``, ``input_shape``, ``mean``, ``std``):
    the images stay on disk and are decoded batch by batch; the labels (CPU int64) are held."""

    name: str
    paths: dict[str, np.ndarray]
    train_y: torch.Tensor
    val_y: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    resize: int
    workers: int
    device: torch.device
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def augment(self) -> dict:
        """What the train split's view does (for display; the views are fixed)."""
        return {"random_size_crop": self.resize, "crop": self.input_shape[1], "flip": True}

    def loader(self, split: str, batch_size: int, *, generator: torch.Generator | None = None,
               drop_last: bool = False) -> FolderLoader:
        """A FolderLoader over ``split``: train shuffled with the train view, the others in order
        with the test view."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        train = split == "train"
        view = partial(train_view if train else eval_view, image_size=self.input_shape[1], resize=self.resize)
        return FolderLoader(self.paths[split], getattr(self, f"{split}_y"), view, batch_size, shuffle=train,
                            generator=generator, drop_last=drop_last, workers=self.workers, device=self.device,
                            mean=self.mean, std=self.std)

    def head(self, split: str, n: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples of ``split`` in order with the test view: (x, y) on the device."""
        if split not in SPLITS:
            raise ValueError(f"split must be 'train', 'val' or 'test', not {split!r}")
        keep = slice(0, max(0, n))
        labels = getattr(self, f"{split}_y")[keep]
        view = partial(eval_view, image_size=self.input_shape[1], resize=self.resize)
        loader = FolderLoader(self.paths[split][keep], labels, view, max(1, min(n, batch_size)), shuffle=False,
                              workers=self.workers, device=self.device, mean=self.mean, std=self.std)
        if not len(labels):
            return torch.empty(0, *self.input_shape, device=self.device), labels.to(self.device)
        xs, ys = zip(*loader, strict=False)
        return torch.cat(xs), torch.cat(ys)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(getattr(self, s + '_y'))}" for s in SPLITS)
        return (f"FolderSplits({self.name!r}, {sizes}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"device={self.device}, workers={self.workers}, augment={self.augment})")


@dataclass
class FolderData:
    """What a folder builder returns: the training pool and the test set as files and labels
    (``pool_y``, ``default_val`` as in :class:`RawData`), and how to view them."""

    pool_paths: np.ndarray
    pool_y: torch.Tensor
    test_paths: np.ndarray
    test_y: torch.Tensor
    classes: list[str]
    image_size: int
    resize: int
    workers: int
    default_val: int | float = IMAGENET_VAL

    def make_splits(self, name: str, n_val: int, split_seed: int, device: torch.device,
                    train_size: int | None = None) -> FolderSplits:
        """Split the pool as :func:`~workers.data.prepare.make_splits` does (same indices for the same labels)."""
        kept, held = split_pool(self.pool_y, n_val, split_seed, train_size)
        paths = {"train": self.pool_paths[kept.numpy()], "val": self.pool_paths[held.numpy()], "test": self.test_paths}
        return FolderSplits(name, paths, self.pool_y[kept], self.pool_y[held], self.test_y, len(self.classes),
                            (3, self.image_size, self.image_size), self.resize, self.workers, torch.device(device),
                            classes=list(self.classes))


# -- the builder -----------------------------------------------------------------------------------
Samples = list[tuple[str, int]]


def _as_arrays(samples: Samples) -> tuple[np.ndarray, torch.Tensor]:
    paths = np.array([os.fsencode(p) for p, _ in samples], dtype=np.bytes_)
    return paths, torch.tensor([c for _, c in samples], dtype=torch.int64)


def _scan(name: str, folder: Path, cause_if_absent: str) -> tuple[Samples, Samples, list[str]]:
    """(train samples, val samples, classes) of ``folder``; DatasetMissingError when either
    split is absent or has no class folder with an image."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    train, val = folder / "train", folder / "val"
    remedies = [
        f"extract ILSVRC2012_img_train.tar into {train}, one folder of images per class (n01440764/, ...)",
        f"extract ILSVRC2012_img_val.tar into {val} and sort its images into the same class folders "
        "(its 50,000 files come unsorted)",
        "set BITBENCH_DATA_DIR (or pass data_dir=...) to a directory whose imagenet/ holds train/ and val/",
    ]
    files = ["train/<class>/<image>", "val/<class>/<image>"]
    try:
        classes, index = find_classes(train)
        found_val, _ = find_classes(val)
        extra = sorted(set(found_val) - set(classes))
        if extra:
            raise ValueError(f"data set {name!r}: {val} has class folders that {train} lacks: {', '.join(extra[:5])}")
        pool = make_dataset(train, index, extensions=IMG_EXTENSIONS)
        test = make_dataset(val, index, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not test:
            raise FileNotFoundError(f"no image files in the class folders of {val}")
    except FileNotFoundError as err:
        raise missing(name, [train, val], files, remedies, f"{cause_if_absent}{err}") from None
    return pool, test, classes


class ImagenetOptions(DatasetOptions):
    """ImageNet's options: the network's input side, the resize side and the decoding processes."""

    image_size: int = Field(224, ge=1, description="side of the network's square input")
    resize: int = Field(256, ge=1, description="the train view's random-size crop is resized to this side, the "
                                               "test view's shorter side too (≥ image_size)")
    workers: int | None = Field(None, ge=0, description="decoding processes per loader (default: the trial's CPUs)")

    @model_validator(mode="after")
    def _resize_covers_the_input(self):
        if self.resize < self.image_size:
            raise ValueError(f"resize ({self.resize}) must be at least image_size ({self.image_size})")
        return self


def build_imagenet(src: Source) -> FolderData:
    """ILSVRC-2012 from ``data_dir/imagenet/{train,val}/<class>/`` (see the module docstring), with
    :class:`ImagenetOptions` in ``src.options``."""
    opts: ImagenetOptions = src.options
    cause = "ImageNet cannot be downloaded automatically (its licence asks for a login at image-net.org). " \
        if src.download else ""
    pool, test, classes = _scan("imagenet", src.root / "imagenet", cause)
    (pool_paths, pool_y), (test_paths, test_y) = _as_arrays(pool), _as_arrays(test)
    n_workers = torch.get_num_threads() if opts.workers is None else opts.workers
    return FolderData(pool_paths, pool_y, test_paths, test_y, classes, opts.image_size, opts.resize, n_workers)

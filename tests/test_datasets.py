"""The dataset layer: registry, loaders over the real on-disk formats, splits, DeviceLoader."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from estimators.registry import UnknownNameError
from workers.data import vision
from workers.data.idx import read_idx
from workers.datasets import (
    DatasetMissingError,
    DatasetOptions,
    DataSplits,
    DeviceLoader,
    list_datasets,
    load_dataset,
    options_model,
    random_crop,
    random_flip,
)

KNOWN = ["cifar10", "cifar100", "digits", "fashion_mnist", "imagenet", "mnist", "synthetic"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test sees the caller's data directory, download permission or Debian files."""
    monkeypatch.delenv("BITBENCH_DATA_DIR", raising=False)
    monkeypatch.delenv("BITBENCH_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")


# --- fixtures in the real on-disk formats -------------------------------------------------------

def pattern_images(n: int, shape: tuple[int, ...]) -> np.ndarray:
    """n distinct uint8 images; image i carries i in its first pixel (a fingerprint)."""
    size = int(np.prod(shape))
    imgs = (np.arange(n)[:, None] * 7 + np.arange(size)[None] * 3) % 256
    imgs[:, 0] = np.arange(n)
    return imgs.astype(np.uint8).reshape(n, *shape)


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """Write uint8 ``array`` as an IDX file: 0, 0, type 0x08, ndim, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def mnist_arrays(n_train: int = 30, n_test: int = 10, offset: int = 0):
    train = pattern_images(n_train, (28, 28))
    test = pattern_images(n_test, (28, 28))
    test[:, 0, 0] = np.arange(n_test) + 100
    labels = [(np.arange(n) + offset) % 10 for n in (n_train, n_test)]
    return train, labels[0].astype(np.uint8), test, labels[1].astype(np.uint8)


def write_mnist(folder: Path, arrays, gz: bool = False) -> None:
    for name, array in zip(vision.IDX_FILES, arrays, strict=False):
        write_idx(folder / name, array, gz=gz)


def write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's python layout: 5 training batches, a test batch and batches.meta with uint8
    rows of 3072 (1024 red, 1024 green, 1024 blue, row-major). Returns the test (images, labels)."""
    folder = root / "cifar-10-batches-py"
    train = pattern_images(5 * per_batch, (3072,))
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        labels = [int(i) % 10 for i in range(rows.start, rows.stop)]
        write_pickle(folder / f"data_batch_{b + 1}", {"data": train[rows], "labels": labels})
    test = pattern_images(n_test, (3072,))
    test_labels = [9 - i % 10 for i in range(n_test)]
    write_pickle(folder / "test_batch", {"data": test, "labels": test_labels})
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return test.reshape(n_test, 3, 32, 32), np.array(test_labels)


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 6) -> None:
    folder = root / "cifar-100-python"
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [(i * 37) % 100 for i in range(n)]
        write_pickle(folder / name, {"data": pattern_images(n, (3072,)), "fine_labels": fine,
                                     "coarse_labels": [f // 5 for f in fine]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})


def pixels(splits: DataSplits, x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation and the [0, 1] scaling: back to uint8 pixel values."""
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    return ((x.double() * std + mean) * 255).round().numpy().astype(np.uint8)


def fingerprints(splits: DataSplits, x: torch.Tensor) -> list[int]:
    return sorted(pixels(splits, x)[:, 0, 0, 0].tolist())


# --- registry and errors ------------------------------------------------------------------------

def test_list_datasets():
    assert list_datasets() == KNOWN


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownNameError) as err:
        load_dataset("imagenet21k")
    assert isinstance(err.value, ValueError)
    assert "imagenet21k" in str(err.value)
    assert all(name in str(err.value) for name in KNOWN)


def test_unknown_option_is_rejected():
    with pytest.raises(UnknownNameError, match="'colour'.*digits"):
        load_dataset("digits", colour=True)
    with pytest.raises(UnknownNameError, match="n_train"):
        load_dataset("synthetic", n_trains=5)


def test_each_data_set_declares_its_options_and_none_is_the_servers():
    """dataset_options reach load_dataset as keywords: none may name where data live, downloading, or
    what the trainer passes itself (seed, device)."""
    for name in list_datasets():
        model = options_model(name)
        assert issubclass(model, DatasetOptions) and model.model_config["extra"] == "forbid"
        assert {"val_size", "train_size", "split_seed"} <= set(model.model_fields)
        assert not {"data_dir", "download", "seed", "device", "name"} & set(model.model_fields), name
    assert set(options_model("synthetic").model_fields) - set(DatasetOptions.model_fields) == {
        "shape", "num_classes", "n_train", "n_val", "n_test", "separation"}


def test_options_of_another_data_set_are_rejected_with_the_known_ones():
    with pytest.raises(UnknownNameError, match="'shape'.*'digits'; known: split_seed, train_size, val_size"):
        load_dataset("digits", shape=[1, 8, 8])


def test_synthetic_size_is_bounded_before_anything_is_drawn():
    with pytest.raises(ValueError, match="over the limit of 1073741824"):
        load_dataset("synthetic", n_train=10**7)


@pytest.mark.parametrize("val_size", [-1, 1797, 1.0, "10", True])
def test_bad_val_size(val_size):
    with pytest.raises(ValueError):
        load_dataset("digits", val_size=val_size)


# --- digits -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits")


def test_digits_shapes_and_sizes(digits):
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and digits.augment == {}
    sizes = [len(digits.train_y), len(digits.val_y), len(digits.test_y)]
    assert sum(sizes) == 1797
    assert sizes == [1077, 360, 360]  # 60/20/20
    for x, y in ((digits.train_x, digits.train_y), (digits.val_x, digits.val_y),
                 (digits.test_x, digits.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(y), 1, 8, 8) and x.device.type == "cpu"
        assert set(y.tolist()) == set(range(10))


def test_digits_split_is_stratified(digits):
    overall = torch.bincount(torch.cat([digits.train_y, digits.val_y, digits.test_y])) / 1797
    for y in (digits.train_y, digits.val_y, digits.test_y):
        share = torch.bincount(y, minlength=10) / len(y)
        assert (share - overall).abs().max() < 0.01


def test_digits_are_scikit_learns_shipped_images_read_without_importing_it():
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from workers.data.digits import read_digits

    images, labels = read_digits()
    bunch = load_digits()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8)
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    probe = "import sys, workers.datasets as d; d.load_dataset('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("n_out", [1, 9, 10, 360, 1000])
def test_split_indices_partitions_with_proportional_classes(n_out):
    from workers.data.prepare import split_indices

    y = torch.from_numpy(np.repeat(np.arange(5), [400, 300, 200, 100, 3]))
    kept, held = split_indices(y, n_out, split_seed=3)
    assert len(held) == n_out and len(kept) == len(y) - n_out
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(len(y)))
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    share = np.bincount(y.numpy()[held], minlength=5)
    expected = n_out * np.array([400, 300, 200, 100, 3]) / len(y)
    if n_out >= 5:  # stratified: every class within one of its exact share
        assert np.all(np.abs(share - expected) < 1.0 + 1e-9), share
    again, other = split_indices(y, n_out, 3), split_indices(y, n_out, 4)
    assert np.array_equal(again[1], held)
    if 1 < n_out < len(y) - 1:
        assert not np.array_equal(other[1], held)


def test_split_indices_falls_back_to_a_plain_permutation_when_a_class_is_a_singleton():
    from workers.data.prepare import split_indices

    y = torch.tensor([0] * 50 + [1])
    kept, held = split_indices(y, 10, split_seed=0)
    assert len(held) == 10 and len(set(kept) | set(held)) == 51


def test_digits_normalised_with_train_statistics(digits):
    assert digits.train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert digits.train_x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert 0.2 < digits.mean[0] < 0.4  # in [0, 1] pixel units (values 0..16 scaled by 1/16)
    raw = digits.test_x * digits.std[0] + digits.mean[0]
    assert raw.min().item() == pytest.approx(0.0, abs=1e-5)
    assert raw.max().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-4)


def test_digits_split_does_not_depend_on_seed(digits):
    other = load_dataset("digits", seed=7)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(digits, f"{split}_x"), getattr(other, f"{split}_x"))
        assert torch.equal(getattr(digits, f"{split}_y"), getattr(other, f"{split}_y"))
    moved = load_dataset("digits", split_seed=1)
    assert not torch.equal(digits.test_x, moved.test_x)


def test_digits_val_size_override(digits):
    fraction = load_dataset("digits", val_size=0.5)
    assert (len(fraction.train_y), len(fraction.val_y), len(fraction.test_y)) == (718, 719, 360)
    none = load_dataset("digits", val_size=0)
    assert len(none.val_y) == 0 and none.val_x.shape == (0, 1, 8, 8) and len(none.train_y) == 1437
    same = [d.test_x * d.std[0] + d.mean[0] for d in (none, digits)]  # same images, other stats
    assert torch.allclose(*same, atol=1e-5) and torch.equal(none.test_y, digits.test_y)


def test_datasplits_repr_is_short(digits):
    text = repr(digits)
    assert "train=1077" in text and len(text) < 200


# --- CIFAR ---------------------------------------------------------------------------------------

def test_cifar10_real_format_round_trips(tmp_path):
    test_images, test_labels = write_cifar10(tmp_path)
    splits = load_dataset("cifar10", data_dir=tmp_path, val_size=5)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    assert splits.augment == {"crop_padding": 4, "flip": True}
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (15, 5, 10)
    assert splits.test_y.tolist() == test_labels.tolist()
    assert np.array_equal(pixels(splits, splits.test_x), test_images)  # CHW layout, exact values
    train_fp = fingerprints(splits, splits.train_x)
    val_fp = fingerprints(splits, splits.val_x)
    assert sorted(train_fp + val_fp) == list(range(20))
    labels = {fp: y for fp, y in zip(pixels(splits, splits.train_x)[:, 0, 0, 0].tolist(),
                                     splits.train_y.tolist(), strict=False)}
    assert all(y == fp % 10 for fp, y in labels.items())
    assert splits.train_x.mean((0, 2, 3)).abs().max() < 1e-5


def test_cifar10_default_split_is_the_papers(tmp_path):
    write_cifar10(tmp_path, per_batch=1200, n_test=10)  # 6,000 images: 1,000 training, 5,000 val
    splits = load_dataset("cifar10", data_dir=tmp_path)
    assert (len(splits.train_y), len(splits.val_y)) == (1000, 5000)
    assert torch.bincount(splits.val_y).tolist() == [500] * 10


def test_cifar100_fine_labels(tmp_path):
    write_cifar100(tmp_path)
    splits = load_dataset("cifar100", data_dir=tmp_path, val_size=2)
    assert splits.num_classes == 100 and (len(splits.train_y), len(splits.test_y)) == (10, 6)
    assert splits.test_y.tolist() == [(i * 37) % 100 for i in range(6)]


def test_missing_cifar_names_the_path(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "BITBENCH_DATA_DIR" in message and "download=True" in message
    assert isinstance(err.value, FileNotFoundError)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "env")
    monkeypatch.setenv("BITBENCH_DATA_DIR", str(tmp_path / "env"))
    assert len(load_dataset("cifar10", val_size=5).test_y) == 10


def test_default_data_dir_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetMissingError, match=str(tmp_path / ".cache/bitbench/data")):
        load_dataset("cifar100")


# --- downloads (the network itself is replaced) --------------------------------------------------

def fake_fetch(calls):
    def fetch(cls, root):
        calls.append((cls.__name__, Path(root)))
        write_cifar10(Path(root))
    return fetch


def test_download_only_when_allowed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(vision, "_fetch", fake_fetch(calls))
    with pytest.raises(DatasetMissingError):
        load_dataset("cifar10", data_dir=tmp_path / "a")
    assert calls == []
    assert len(load_dataset("cifar10", data_dir=tmp_path / "a", download=True, val_size=5).test_y) == 10
    monkeypatch.setenv("BITBENCH_ALLOW_DOWNLOAD", "1")
    load_dataset("cifar10", data_dir=tmp_path / "b", val_size=5)
    assert calls == [("CIFAR10", tmp_path / "a"), ("CIFAR10", tmp_path / "b")]
    load_dataset("cifar10", data_dir=tmp_path / "b", val_size=5)  # present: no second download
    assert len(calls) == 2


def test_failed_download_is_a_missing_dataset(tmp_path, monkeypatch):
    def offline(cls, root):
        raise OSError("no network")
    monkeypatch.setattr(vision, "_fetch", offline)
    with pytest.raises(DatasetMissingError, match="(?s)cifar-10-batches-py.*no network"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)


# --- MNIST and Fashion-MNIST ----------------------------------------------------------------------

def check_mnist_like(splits: DataSplits, arrays, val_size: int) -> None:
    train, train_labels, test, test_labels = arrays
    assert splits.input_shape == (1, 28, 28) and splits.augment == {}
    assert (len(splits.train_y), len(splits.val_y)) == (len(train) - val_size, val_size)
    assert np.array_equal(pixels(splits, splits.test_x)[:, 0], test)
    assert splits.test_y.tolist() == test_labels.tolist()
    fp = fingerprints(splits, torch.cat([splits.train_x, splits.val_x]))
    assert fp == list(range(len(train)))


def test_mnist_torchvision_layout(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path / "MNIST" / "raw", arrays)
    assert torchvision.datasets.MNIST(str(tmp_path), train=False).data.shape == (10, 28, 28)
    check_mnist_like(load_dataset("mnist", data_dir=tmp_path, val_size=10), arrays, 10)


def test_mnist_gzipped_files(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path / "MNIST" / "raw", arrays, gz=True)
    check_mnist_like(load_dataset("mnist", data_dir=tmp_path, val_size=10), arrays, 10)


def test_fashion_mnist_falls_back_to_debian_package(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = mnist_arrays()
    write_mnist(debian, arrays, gz=True)  # the package ships the four files gzipped
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST", debian)
    check_mnist_like(load_dataset("fashion_mnist", data_dir=tmp_path / "empty", val_size=10),
                     arrays, 10)
    own = mnist_arrays(offset=3)  # the data directory wins over the package
    write_mnist(tmp_path / "mine" / "FashionMNIST" / "raw", own)
    check_mnist_like(load_dataset("fashion_mnist", data_dir=tmp_path / "mine", val_size=10), own, 10)


def test_missing_fashion_mnist_explains_remedies(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert str(vision.DEBIAN_FASHION_MNIST) in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="implies"):
        read_idx(short)


@pytest.mark.skipif(not (Path("/usr/share/datasets/fashion-mnist") /
                         "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(vision, "DEBIAN_FASHION_MNIST", Path("/usr/share/datasets/fashion-mnist"))
    splits = load_dataset("fashion_mnist", data_dir=tmp_path)
    assert (len(splits.train_y), len(splits.val_y), len(splits.test_y)) == (55000, 5000, 10000)
    assert torch.bincount(splits.val_y).tolist() == [500] * 10
    assert torch.bincount(splits.test_y).tolist() == [1000] * 10


# --- synthetic ------------------------------------------------------------------------------------

def test_synthetic_shapes_and_seeding():
    opts = dict(shape=[2, 5, 7], num_classes=4, n_train=40, n_val=8, n_test=12)
    a = load_dataset("synthetic", seed=1, **opts)
    assert a.input_shape == (2, 5, 7) and a.num_classes == 4
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (40, 8, 12)
    assert torch.bincount(a.test_y).tolist() == [3] * 4
    assert torch.equal(a.train_x, load_dataset("synthetic", seed=1, **opts).train_x)
    assert not torch.equal(a.train_x, load_dataset("synthetic", seed=2, **opts).train_x)
    with pytest.raises(ValueError, match="shape"):
        load_dataset("synthetic", shape=(3, 32))


def test_synthetic_labels_are_learnable():
    s = load_dataset("synthetic", shape=(3, 8, 8), n_train=500, n_val=0, n_test=500, separation=0.3)
    centroids = torch.stack([s.train_x[s.train_y == k].mean(0) for k in range(10)]).flatten(1)
    guess = torch.cdist(s.test_x.flatten(1), centroids).argmin(1)
    assert (guess == s.test_y).float().mean() > 0.5  # chance is 0.1


# --- DeviceLoader ---------------------------------------------------------------------------------

def index_data(n: int = 23):
    """x[i] is a 1×1×1 image holding i, so a batch's x tells which samples it holds."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n)


def collect(loader) -> list[list[int]]:
    return [yb.tolist() for _, yb in loader]


def test_loader_covers_each_sample_once_per_epoch():
    x, y = index_data()
    loader = DeviceLoader(x, y, 5, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 5
    first, second = collect(loader), collect(loader)
    for epoch in (first, second):
        assert [len(b) for b in epoch] == [5, 5, 5, 5, 3]
        assert sorted(sum(epoch, [])) == list(range(23))
    assert first != second  # a fresh order each epoch
    for xb, yb in loader:
        assert torch.equal(xb.view(-1).long(), yb)


def test_loader_order_is_deterministic_given_the_generator():
    x, y = index_data()
    runs = [collect(DeviceLoader(x, y, 4, shuffle=True, generator=torch.Generator().manual_seed(s)))
            for s in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_loader_without_shuffle_and_drop_last():
    x, y = index_data()
    assert collect(DeviceLoader(x, y, 10, shuffle=False)) == [list(range(10)), list(range(10, 20)),
                                                               [20, 21, 22]]
    loader = DeviceLoader(x, y, 10, shuffle=True, drop_last=True, generator=torch.Generator())
    assert len(loader) == 2 and [len(b) for b in collect(loader)] == [10, 10]
    assert len(DeviceLoader(x, y, 30, shuffle=False, drop_last=True)) == 0


def test_loader_rejects_bad_arguments():
    x, y = index_data()
    with pytest.raises(ValueError):
        DeviceLoader(x, y[:-1], 4, shuffle=False)
    with pytest.raises(ValueError):
        DeviceLoader(x, y, 0, shuffle=False)
    with pytest.raises(ValueError):
        DeviceLoader(x.view(-1), y, 4, shuffle=False, flip=True)


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img (C, H, W) moved down by dy and right by dx, zeros filling in."""
    out = torch.zeros_like(img)
    _, h, w = img.shape
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = img[:, i - dy, j - dx]
    return out


def which_shift(out: torch.Tensor, img: torch.Tensor, pad: int) -> tuple[int, int]:
    matches = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
               if torch.equal(out, shifted(img, dy, dx))]
    assert len(matches) == 1, "a crop must equal exactly one zero-filled shift of its input"
    return matches[0]


def test_random_crop_is_a_zero_filled_shift():
    img = torch.arange(1, 2 * 5 * 6 + 1, dtype=torch.float32).view(2, 5, 6)
    out = random_crop(img.expand(64, -1, -1, -1), 2, torch.Generator().manual_seed(0))
    assert out.shape == (64, 2, 5, 6)
    shifts = {which_shift(o, img, 2) for o in out}
    assert len(shifts) > 10  # independent offsets per sample, 25 possible
    assert torch.equal(random_crop(img[None], 0), img[None])


def test_random_flip_flips_about_half():
    img = torch.arange(12, dtype=torch.float32).view(1, 3, 4)
    out = random_flip(img.expand(200, -1, -1, -1), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, img.flip(-1)) for o in out])
    unchanged = torch.tensor([torch.equal(o, img) for o in out])
    assert bool((flipped ^ unchanged).all())
    assert 60 < int(flipped.sum()) < 140


def test_loader_augmentation_is_deterministic_and_keeps_labels():
    x = torch.randn(40, 3, 8, 8)
    y = torch.arange(40)

    def epoch(seed):
        loader = DeviceLoader(x, y, 16, shuffle=True, crop_padding=2, flip=True,
                              generator=torch.Generator().manual_seed(seed))
        return [(xb.clone(), yb) for xb, yb in loader]

    a, b = epoch(5), epoch(5)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=False))
    xb, yb = a[0]
    assert xb.shape == (16, 3, 8, 8)
    assert not torch.equal(xb, x[yb])  # augmented...
    for out, i in zip(xb, yb, strict=False):  # ...but each sample is still a shifted (maybe mirrored) copy
        src = x[i]
        assert any(torch.equal(out, shifted(s, dy, dx)) for s in (src, src.flip(-1))
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_datasplits_loader_uses_augment_for_train_only(tmp_path):
    write_cifar10(tmp_path)
    splits = load_dataset("cifar10", data_dir=tmp_path, val_size=5)
    train = splits.loader("train", 4, generator=torch.Generator().manual_seed(0))
    assert (train.crop_padding, train.flip, train.shuffle) == (4, True, True)
    test = splits.loader("test", 4)
    assert (test.crop_padding, test.flip, test.shuffle) == (0, False, False)
    assert torch.equal(torch.cat([xb for xb, _ in test]), splits.test_x)
    with pytest.raises(ValueError):
        splits.loader("holdout", 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_generator():
    splits = load_dataset("synthetic", device="cuda", n_train=64, n_val=0, n_test=8)
    assert splits.train_x.is_cuda and splits.test_y.is_cuda
    ref = load_dataset("synthetic", n_train=64, n_val=0, n_test=8)
    assert torch.allclose(splits.train_x.cpu(), ref.train_x, atol=1e-5)
    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        index = torch.arange(64, device="cuda")
        loader = DeviceLoader(splits.train_x, index, 16, shuffle=True, generator=gen,
                              crop_padding=4, flip=True)
        batches = list(loader)
        assert all(xb.is_cuda and yb.is_cuda for xb, yb in batches)
        assert sorted(torch.cat([yb for _, yb in batches]).tolist()) == list(range(64))


def test_train_size_keeps_a_fixed_stratified_subset():
    full = load_dataset("digits")
    a = load_dataset("digits", train_size=500, seed=1)
    b = load_dataset("digits", train_size=500, seed=2)
    assert len(a.train_y) == 500 and torch.equal(a.train_x, b.train_x)
    assert torch.equal(a.test_y, full.test_y) and torch.equal(a.val_y, full.val_y)
    counts = torch.bincount(a.train_y, minlength=10).float() / 500
    assert (counts - torch.bincount(full.train_y, minlength=10).float() / len(full.train_y)).abs().max() < 0.02

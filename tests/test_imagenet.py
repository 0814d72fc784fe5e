"""``imagenet`` from class folders: splits, views, streaming loaders, errors, and run_trial end to end.

The tests write a tiny ImageNet (6 classes, 4 train + 2 val JPEGs each, odd sizes): every image is
noise around its class's colour, so a crop's mean colour says which class it came from.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from estimators import UnknownNameError
from tests.test_train import train
from workers.data.folder import IMAGENET_MEAN, IMAGENET_STD, FolderSplits, random_size_box
from workers.datasets import DatasetMissingError, load_dataset
from workers.spec import parse_spec
from workers.train import METRIC_KEYS

CLASSES = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (120, 120, 120)]
SIZES = [(48, 36), (36, 52), (64, 44), (40, 40)]  # (width, height)
OPTS = {"image_size": 24, "resize": 28}


def write_image(path, colour, size, rng, mode="RGB"):
    w, h = size
    pixels = np.clip(np.array(colour)[None, None] + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    (img.convert("L") if mode == "L" else img).save(path, quality=95)


def write_imagenet(root, per_split=(("train", 4), ("val", 2)), classes=CLASSES, val_classes=None):
    rng = np.random.default_rng(0)
    for split, per in per_split:
        for c, name in enumerate(classes):
            if split == "val" and val_classes is not None and name not in val_classes:
                continue
            folder = root / "imagenet" / split / name
            folder.mkdir(parents=True)
            for i in range(per):
                write_image(folder / f"{name}_{i}.JPEG", COLOURS[c], SIZES[i % len(SIZES)], rng)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("data"))


def load(root, **kw):
    return load_dataset("imagenet", data_dir=root, **{**OPTS, "workers": 0, **kw})


def expected(label: int) -> torch.Tensor:
    """The normalised per-channel value of class ``label``'s colour."""
    return (torch.tensor(COLOURS[label]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def check_colours(x: torch.Tensor, y: torch.Tensor) -> None:
    """Each image's mean colour is its label's (noise ±20 averages out; JPEG and resizing move it a little)."""
    means = x.mean((2, 3))
    for m, label in zip(means, y.tolist(), strict=False):
        assert torch.allclose(m, expected(label), atol=6 / 255 / min(IMAGENET_STD)), (m, label)


def passes(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


# -- splits and views -------------------------------------------------------------------------------
def test_splits_from_class_folders(root):
    data = load(root)
    assert isinstance(data, FolderSplits)
    assert data.classes == CLASSES and data.num_classes == 6 and data.input_shape == (3, 24, 24)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (23, 1, 12)  # 1% of 24 rounded up
    assert data.test_y.tolist() == [c for c in range(6) for _ in range(2)]  # val/ in class, then file order
    assert sorted(data.train_y.tolist() + data.val_y.tolist()) == [c for c in range(6) for _ in range(4)]
    assert repr(data).startswith("FolderSplits('imagenet', train=23, val=1, test=12, input_shape=(3, 24, 24)")
    assert data.augment == {"random_size_crop": 28, "crop": 24, "flip": True}


def test_validation_is_carved_from_train_stratified_and_fixed(root):
    a, b = load(root, val_size=6), load(root, val_size=6, seed=5)
    assert sorted(a.val_y.tolist()) == list(range(6))  # one per class
    assert [p for p in a.paths["val"]] == [p for p in b.paths["val"]]  # the seed does not move the split
    assert set(a.paths["val"]).isdisjoint(a.paths["train"])
    assert all(b"/imagenet/train/" in p for p in a.paths["val"])
    assert len(load(root, val_size=6, train_size=12).train_y) == 12


def test_eval_view_is_a_centre_crop_normalised_with_imagenet_statistics(root):
    data = load(root)
    x, y = data.head("test", 5)
    assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32 and y.tolist() == [0, 0, 1, 1, 2]
    check_colours(x, y)
    (first_x, first_y), *_ = passes(data.loader("test", 5))
    assert torch.equal(first_x, x) and torch.equal(first_y, y)
    # the centre crop of the shorter side resized to 28: a 48×36 image becomes 37×28, cut at (2, 6)
    img = Image.open(data.paths["test"][0].decode()).convert("RGB").resize((37, 28), Image.BILINEAR)
    ref = torch.from_numpy(np.asarray(img)[2:26, 6:30].copy()).permute(2, 0, 1).float()
    got = x[0] * torch.tensor(IMAGENET_STD)[:, None, None] * 255 + torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    assert (got - ref).abs().max() <= 1.0


def test_train_loader_shuffles_augments_and_keeps_labels(root):
    data = load(root)
    loader = data.loader("train", 8, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 3
    one, two = passes(loader), passes(loader)
    for batches in (one, two):
        assert [len(y) for _, y in batches] == [8, 8, 7]
        assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(data.train_y.tolist())
        for x, y in batches:
            assert x.shape[1:] == (3, 24, 24)
            check_colours(x, y)
    assert [y.tolist() for _, y in one] != [y.tolist() for _, y in two]  # a new order each pass
    assert len(data.loader("train", 8, drop_last=True)) == 2


def test_train_batches_depend_only_on_the_generator_not_the_workers(root):
    def run(workers, seed):
        d = load(root, workers=workers)
        return passes(d.loader("train", 8, generator=torch.Generator().manual_seed(seed)))

    ref = run(0, 1)
    for other in (run(0, 1), run(2, 1)):
        assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(ref, other, strict=False))
    diff = run(0, 2)
    assert any(not torch.equal(a, b) for (a, _), (b, _) in zip(ref, diff, strict=False))


def test_random_size_box_stays_in_the_image_with_the_published_ranges():
    rng = np.random.default_rng(0)
    for _ in range(500):
        top, left, h, w = random_size_box(50, 30, rng)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        assert 0.08 * 1500 * 0.8 <= h * w <= 1500
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 * 1.15
    # a 1000×10 strip admits no such crop: the largest centred crop of aspect 4/3
    assert random_size_box(1000, 10, rng) == (0, 493, 10, 13)
    assert random_size_box(10, 1000, rng) == (493, 0, 13, 10)


def test_greyscale_images_become_rgb(tmp_path):
    write_imagenet(tmp_path, per_split=(("train", 2), ("val", 1)), classes=CLASSES[:2])
    write_image(tmp_path / "imagenet" / "train" / CLASSES[0] / "grey.JPEG", COLOURS[5], (30, 30),
                np.random.default_rng(1), mode="L")
    data = load(tmp_path, val_size=0)
    x, y = next(iter(data.loader("train", 5, generator=torch.Generator().manual_seed(0))))
    assert x.shape == (5, 3, 24, 24)


def test_val_may_hold_fewer_classes_but_not_others(tmp_path):
    write_imagenet(tmp_path / "a", val_classes=CLASSES[2:4])
    data = load(tmp_path / "a")
    assert data.num_classes == 6 and data.test_y.tolist() == [2, 2, 3, 3]  # train/'s class indices
    write_imagenet(tmp_path / "b")
    (tmp_path / "b" / "imagenet" / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        load(tmp_path / "b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_with_a_cuda_generator(root):
    """The trainer's generator lives on the device: the pass seed is drawn there, batches land there."""
    data, ref = load(root, device="cuda", workers=1), load(root)
    x, y = data.head("test", 12)
    assert x.is_cuda and y.is_cuda and torch.allclose(x.cpu(), ref.head("test", 12)[0], atol=1e-5)
    gen = torch.Generator(device="cuda").manual_seed(0)
    one, two = passes(data.loader("train", 8, generator=gen)), passes(data.loader("train", 8, generator=gen))
    gen.manual_seed(0)
    again = passes(data.loader("train", 8, generator=gen))
    assert all(xb.is_cuda and yb.is_cuda for xb, yb in one)
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(one, again, strict=False))
    assert [y.tolist() for _, y in one] != [y.tolist() for _, y in two]
    check_colours(torch.cat([xb for xb, _ in one]).cpu(), torch.cat([yb for _, yb in one]).cpu())


# -- errors -----------------------------------------------------------------------------------------
def test_missing_imagenet_names_the_paths_and_how_to_provide_it(tmp_path):
    with pytest.raises(DatasetMissingError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "imagenet" / "train") in msg and str(tmp_path / "imagenet" / "val") in msg
    assert "ILSVRC2012_img_train.tar" in msg and "BITBENCH_DATA_DIR" in msg
    with pytest.raises(DatasetMissingError, match="cannot be downloaded"):
        load_dataset("imagenet", data_dir=tmp_path, download=True)


def test_unsorted_val_folder_is_a_missing_dataset(tmp_path):
    write_imagenet(tmp_path, per_split=(("train", 2),))
    val = tmp_path / "imagenet" / "val"
    val.mkdir()
    write_image(val / "ILSVRC2012_val_00000001.JPEG", COLOURS[0], (30, 30), np.random.default_rng(0))
    with pytest.raises(DatasetMissingError, match="sort its images into the same class folders") as e:
        load(tmp_path)
    assert f"class folder in {val}" in str(e.value)


def test_bad_options_are_refused(root):
    with pytest.raises(ValueError, match="image_size"):
        load(root, image_size=32, resize=28)
    with pytest.raises(ValueError, match="workers"):
        load(root, workers=-1)
    with pytest.raises(UnknownNameError, match="known: image_size, resize, split_seed, train_size, val_size, workers"):
        load(root, crop=3)


# -- through the trainer ----------------------------------------------------------------------------
def imagenet_spec(model, epochs=1, **over):
    return parse_spec({"name": "in", "dataset": "imagenet", "model": model, "estimators": ["aqe"],
                       "bits": [{"w": 1, "a": 1}], "include_full_precision": False, "epochs": epochs,
                       "batch_size": 8, "dataset_options": {**OPTS, "val_size": 6}, **over})


def trained(spec, root, **kw):
    return train(spec, spec.trials()[0].key, data_dir=root, **kw)


def test_run_trial_trains_resnet18_on_the_folder_with_top5(root):
    """One epoch of the ImageNet ResNet-18 (at 24×24) through run_trial, decoding in a worker process."""
    final, seen = trained(imagenet_spec("resnet18"), root)
    (m, state), = seen
    assert set(m) == set(METRIC_KEYS)
    assert m["train_loss"] > 0 and 0 <= m["test_acc"] <= m["test_top5"] <= 1
    assert m["test_top5"] in {k / 12 for k in range(13)}  # a count of the 12 val/ images
    assert m["weight_flips"] > 0 and m["images_per_s"] > 0
    assert final["final_test_top5"] == m["test_top5"] and final["packed_bytes"] is None  # no packed form


def test_run_trial_on_the_folder_resumes_bit_exactly(root):
    spec = imagenet_spec("digits_net", epochs=2)
    final, seen = trained(spec, root)
    again, resumed = trained(spec, root, resume_state=seen[0][1])
    assert again == final
    drop = ("epoch_seconds", "images_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m, _ in resumed] == \
        [{k: v for k, v in m.items() if k not in drop} for m, _ in seen[1:]]
    assert all(torch.equal(resumed[0][1]["model"][k], seen[1][1]["model"][k]) for k in seen[1][1]["model"])

"""POST /runs?dry_run=1 (and workers.plan): validate and expand a spec, queue nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import store
from service.app import create_app
from service.config import Settings
from workers.data import vision
from workers.plan import dry_run, read_gpu_figures
from workers.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = json.loads((ROOT / "studies" / "cifar10_paper_table1.json").read_text())
CIFAR100 = json.loads((ROOT / "studies" / "cifar100_paper_table2.json").read_text())


@pytest.fixture
def client(db_url, monkeypatch, tmp_path):
    monkeypatch.setenv("BITBENCH_GPU_FIGURES", str(tmp_path / "absent.json"))
    with TestClient(create_app(Settings(database_url=db_url, api_token=None))) as c:
        yield c


def rows(client) -> dict:
    with client.app.state.session_factory() as s:
        return store.count_rows(s)


@pytest.mark.parametrize("body", [*CIFAR10, *CIFAR100], ids=lambda b: b["name"])
def test_the_paper_grids_dry_run_without_writing(client, body, tmp_path, monkeypatch):
    monkeypatch.setenv("BITBENCH_GPU_FIGURES", str(tmp_path / "none.json"))  # as on a checkout without figures
    before = rows(client)
    r = client.post("/runs?dry_run=1", json=body)
    assert r.status_code == 200, r.text
    plan = r.json()
    spec = parse_spec(body)
    assert plan["trials"] == spec.trial_count() == len(spec.trials()) == 155
    assert plan["trials_by_label"] == {"float": 5, "aqe": 75, "clipped_ste": 75}
    assert (plan["spec_hash"], plan["epochs"], plan["train_images_per_epoch"]) == (spec.spec_hash(), 200, 45_000)
    assert plan["estimated_gpu_s"] is None and plan["estimate"].startswith("no GPU figures recorded")
    folder, files = vision.CIFAR_FILES[body["dataset"]]
    assert plan["data_files"] == [f"{folder}/{f}" for f in files]
    assert rows(client) == before == {"runs": 0, "trials": 0, "metrics": 0}


def test_a_bad_spec_dry_runs_to_the_same_422(client):
    bad = {**CIFAR10[0], "epochs": 0}
    r = client.post("/runs?dry_run=1", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "epochs"]
    assert rows(client) == {"runs": 0, "trials": 0, "metrics": 0}
    assert client.post("/runs?dry_run=0", json=CIFAR10[0]).status_code == 202  # without it: queued
    assert rows(client) == {"runs": 1, "trials": 155, "metrics": 0}


def test_the_estimate_uses_the_recorded_gpu_figures(tmp_path, monkeypatch):
    spec = parse_spec({**CIFAR10[3], "dataset_options": {"train_size": 9_000}})
    figures = {"card": "Test GPU", "images_per_s": {"convnet_d": 30_000.0}}
    plan = dry_run(spec, figures)
    assert plan["train_images_per_epoch"] == 9_000
    assert plan["estimated_gpu_s"] == pytest.approx(155 * 200 * 9_000 / 30_000.0)
    assert "Test GPU" in plan["estimate"]
    assert dry_run(parse_spec(CIFAR10[0]), figures)["estimated_gpu_s"] is None  # no figure for convnet_a
    path = tmp_path / "gpu_figures.json"
    path.write_text(json.dumps(figures))
    monkeypatch.setenv("BITBENCH_GPU_FIGURES", str(path))
    assert dry_run(spec)["estimated_gpu_s"] == pytest.approx(9_300.0)


def test_the_committed_gpu_figures_estimate_model_a(monkeypatch):
    """bench/gpu_figures.json, as bench/gpu.py recorded it on a GPU, is what a dry run reads by default."""
    monkeypatch.delenv("BITBENCH_GPU_FIGURES", raising=False)
    figures = read_gpu_figures()
    assert figures is not None and figures["card"] and figures["command"].startswith("python bench/gpu.py")
    spec = parse_spec(CIFAR10[0])
    assert spec.model == "convnet_a"
    plan = dry_run(spec)
    rate = figures["images_per_s"]["convnet_a"]
    assert plan["estimated_gpu_s"] == pytest.approx(155 * 200 * 45_000 / rate)
    assert figures["card"] in plan["estimate"]


def test_data_files_per_data_set():
    def files(name, **options):
        return dry_run(parse_spec({"name": "f", "dataset": name, "estimators": ["ste"], **options}))["data_files"]

    assert files("digits") == [] and files("synthetic") == []
    assert files("fashion_mnist") == [f"FashionMNIST/raw/{f}[.gz]" for f in vision.IDX_FILES]
    assert files("mnist")[0] == "MNIST/raw/train-images-idx3-ubyte[.gz]"


@pytest.mark.parametrize("name, cls", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100")])
def test_the_cifar_file_lists_are_torchvisions(name, cls):
    from torchvision import datasets

    tv = getattr(datasets, cls)
    folder, files = vision.CIFAR_FILES[name]
    assert folder == tv.base_folder and list(files) == vision._cifar_files(tv)

"""Trial provenance (workers.provenance): read without git, from a real trial into a real database and
out of the API."""
from __future__ import annotations

import platform
import shutil
import socket
import subprocess
from contextlib import ExitStack

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from service.sink import SqlSink
from workers import provenance as prov
from workers.spec import parse_spec
from workers.train import run_trial

SHA_A, SHA_B, SHA_C = "a" * 40, "b" * 40, "c" * 40


# -- git_commit: the checkout's .git files, no git process ---------------------------------------
def test_commit_of_a_branch_from_its_loose_ref(tmp_path):
    (tmp_path / ".git/refs/heads").mkdir(parents=True)
    (tmp_path / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git/refs/heads/main").write_text(SHA_A + "\n")
    (tmp_path / ".git/packed-refs").write_text(f"# pack-refs with: peeled\n{SHA_B} refs/heads/main\n")
    assert prov.git_commit(tmp_path) == SHA_A  # a loose ref is newer than the packed one


def test_commit_of_a_branch_from_packed_refs_and_of_a_detached_head(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git/packed-refs").write_text(f"# pack-refs with: peeled\n{SHA_C} refs/heads/other\n"
                                               f"{SHA_B} refs/heads/main\n^{SHA_A}\n")
    assert prov.git_commit(tmp_path) == SHA_B
    (tmp_path / ".git/HEAD").write_text(SHA_C.upper() + "\n")
    assert prov.git_commit(tmp_path) == SHA_C


def test_commit_of_a_worktree_reads_its_gitdir_and_the_common_refs(tmp_path):
    main = tmp_path / "main/.git"
    (main / "worktrees/wt").mkdir(parents=True)
    (main / "refs/heads").mkdir(parents=True)
    (main / "refs/heads/topic").write_text(SHA_C + "\n")
    (main / "worktrees/wt/HEAD").write_text("ref: refs/heads/topic\n")
    (main / "worktrees/wt/commondir").write_text("../..\n")
    wt = tmp_path / "wt"
    wt.mkdir()
    (wt / ".git").write_text("gitdir: ../main/.git/worktrees/wt\n")  # relative, as `git worktree` may write it
    assert prov.git_commit(wt) == SHA_C


def test_no_checkout_or_an_unknown_branch_has_no_commit(tmp_path):
    assert prov.git_commit(tmp_path) is None
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git/HEAD").write_text("ref: refs/heads/nowhere\n")
    assert prov.git_commit(tmp_path) is None
    (tmp_path / ".git/HEAD").write_text("not a sha\n")
    assert prov.git_commit(tmp_path) is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_of_this_checkout_is_what_git_says():
    if not (prov.SOURCE_ROOT / ".git").exists():
        pytest.skip("the code is not a git checkout")
    head = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=prov.SOURCE_ROOT, text=True)
    assert prov.git_commit() == head.strip()


def test_the_process_part_is_read_once():
    assert prov.process_provenance() is prov.process_provenance()


# -- a real trial, through the SQL sink, out of the API -----------------------------------------
def expected_outside_ray() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": socket.gethostname(), "git_commit": prov.git_commit(), "gpu": None, "device": "cpu",
            "ray_node_id": None, "ray_node_ip": None, "ray_gpu_ids": None}


@pytest.fixture
def client(db_url):
    with ExitStack() as stack:
        yield stack.enter_context(TestClient(create_app(Settings(database_url=db_url, api_token=None))))


@pytest.mark.timeout(300)
def test_a_trained_trial_shows_its_provenance_in_the_api(client):
    body = {"name": "provenance", "dataset": "digits", "estimators": ["ste"], "include_full_precision": False,
            "epochs": 1, "batch_size": 256}
    run = client.post("/runs", json=body)
    assert run.status_code == 202, run.text
    run_id = run.json()["id"]
    spec = parse_spec(body)
    trial = spec.trials()[0]
    sink = SqlSink(client.app.state.session_factory, run_id)
    sink.on_trial_start(trial.key, {"device": "cuda:0", "attempt": 1})  # the driver's guess, before the worker
    final = run_trial(spec, trial, on_start=lambda p: sink.on_provenance(trial.key, p), threads=1,
                      on_epoch=lambda metrics, _state: sink.on_epoch(trial.key, metrics))
    sink.on_trial_end(trial.key, "done", final, None)

    (listed,) = client.get(f"/runs/{run_id}/trials").json()
    shown = client.get(f"/trials/{listed['id']}").json()
    assert shown["status"] == "done" and len(shown["metrics"]) == 1
    p = shown["provenance"]
    assert p == listed["provenance"]
    assert {k: p[k] for k in expected_outside_ray()} == expected_outside_ray()
    assert p["cpu"] and p["ray"] and p["bitbench"]
    assert shown["device"] == "cpu"  # the worker's actual device replaces the driver's guess


def test_trials_without_provenance_show_null(client):
    run = client.post("/runs", json={"name": "p", "estimators": ["ste"], "include_full_precision": False})
    (trial,) = client.get(f"/runs/{run.json()['id']}/trials").json()
    assert trial["provenance"] is None
    assert client.get(f"/trials/{trial['id']}").json()["provenance"] is None

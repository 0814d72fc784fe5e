"""A trial given a GPU that sees no CUDA device fails and says so, unless its spec asks for the CPU
fallback (``resources.cpu_fallback``); the field leaves the hashes of existing specs alone."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

import workers.train
from service import store
from service.app import create_app
from service.config import Settings
from service.db import make_engine, migrate, session_factory
from workers.spec import parse_spec
from workers.train import NoCudaDeviceError, release_memory, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def gpu_spec(**resources):
    return parse_spec({"name": "gpu", "estimators": ["ste"], "resources": {"cpu": 2, "gpu": 0.25, **resources}})


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- the spec field ---------------------------------------------------------------------------
def test_cpu_fallback_is_off_by_default_and_leaves_older_spec_hashes_alone():
    assert gpu_spec().resources.cpu_fallback is False
    # the hash this spec had before the field existed (and its Tune experiment's name with it)
    assert gpu_spec().spec_hash() == "a402b64e549c5d421fccbb6b731062d99f77249b9ec7a2391ef01f634a400ed5"
    assert gpu_spec(cpu_fallback=False).spec_hash() == gpu_spec().spec_hash()
    on = gpu_spec(cpu_fallback=True)
    assert on.spec_hash() != gpu_spec().spec_hash()
    assert parse_spec(on.canonical_json()).resources.cpu_fallback is True  # stored, read back


def test_cpu_fallback_must_be_a_boolean():
    with pytest.raises(ValidationError) as e:
        gpu_spec(cpu_fallback="yes")
    assert e.value.errors()[0]["loc"] == ("resources", "cpu_fallback")


# -- resolve_device ---------------------------------------------------------------------------
def test_a_gpu_trial_without_cuda_fails_and_says_why(no_cuda):
    with pytest.raises(NoCudaDeviceError) as e:
        resolve_device(gpu_spec())
    msg = str(e.value)
    assert "asked for 0.25 GPU" in msg and "no CUDA device" in msg and socket.gethostname() in msg
    assert "resources.cpu_fallback" in msg and torch.__version__ in msg
    assert (f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA") in msg


def test_the_cpu_fallback_trains_on_the_cpu_and_warns(no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="workers.train"):
        assert resolve_device(gpu_spec(cpu_fallback=True)) == torch.device("cpu")
    assert "no CUDA device" in caplog.text and "training on the CPU" in caplog.text


def test_cpu_trials_and_an_explicit_device_need_no_gpu(no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="workers.train"):
        assert resolve_device(parse_spec({"name": "c", "estimators": ["ste"]})) == torch.device("cpu")
        assert resolve_device(gpu_spec(), "cpu") == torch.device("cpu")
    assert caplog.text == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_trial_with_cuda_trains_on_it():
    assert resolve_device(gpu_spec()).type == "cuda"


# -- the CUDA branches, on a CPU machine: torch.cuda's calls replaced by recorders ------------
@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a trial on GPU 3 sees it; returns the calls made to it."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["cuda rng"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append(("set_rng", states)))
    return calls


def test_a_gpu_trial_runs_on_the_current_cuda_device_unless_one_is_named(fake_cuda):
    assert resolve_device(gpu_spec()) == torch.device("cuda", 3)
    assert resolve_device(gpu_spec(), "cuda") == torch.device("cuda", 3)
    assert resolve_device(gpu_spec(), "cuda:1") == torch.device("cuda", 1)


def test_after_a_cuda_trial_the_cached_blocks_go_back_to_the_driver(fake_cuda):
    release_memory(torch.device("cpu"))
    assert fake_cuda == []
    release_memory(torch.device("cuda", 3))
    assert fake_cuda == ["empty_cache"]


def test_a_cuda_trials_checkpoint_holds_and_restores_the_cuda_generators(fake_cuda):
    gen, cuda, cpu = torch.Generator(), torch.device("cuda", 3), torch.device("cpu")
    on_gpu, on_cpu = workers.train._rng_state(gen, cuda), workers.train._rng_state(gen, cpu)
    assert on_gpu["cuda"] == ["cuda rng"] and on_cpu["cuda"] is None
    workers.train._set_rng_state(on_cpu, gen, cuda)  # a state without CUDA generators: nothing to restore
    workers.train._set_rng_state(on_gpu, gen, cpu)  # a CPU trial leaves the CUDA generators alone
    assert fake_cuda == []
    workers.train._set_rng_state(on_gpu, gen, cuda)
    assert fake_cuda == [("set_rng", ["cuda rng"])]


# -- through a real dispatcher and Ray, on a node whose GPU torch cannot see ------------------
DISPATCH = """
import sys, ray
from service.config import Settings
from service.db import make_engine, session_factory
from service.dispatcher import Dispatcher

# Ray believes in one GPU; its workers see none (and Ray is told not to set CUDA_VISIBLE_DEVICES for them)
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"CUDA_VISIBLE_DEVICES": "", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}})
settings = Settings(database_url=sys.argv[1], tune_dir=sys.argv[2], heartbeat_s=1)
dispatcher = Dispatcher(session_factory(make_engine(settings.database_url)), settings, worker_id="gpu-node")
while dispatcher.run_once() is not None:
    pass
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_misconfigured_gpu_node_fails_the_run_with_the_reason_and_the_fallback_trains_on_the_cpu():
    """Ray gives the trial GPU 0 but the worker's CUDA_VISIBLE_DEVICES is empty: torch sees no CUDA device,
    as on a node whose driver or container lost the GPU."""
    base = {"estimators": ["ste"], "include_full_precision": False, "epochs": 1, "batch_size": 256, "max_retries": 0}
    with tempfile.TemporaryDirectory(prefix="bb-gpu-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        url = f"sqlite:///{tmp / 'gpu.sqlite'}"
        engine = make_engine(url)
        migrate(engine)
        with session_factory(engine)() as s:
            strict = store.create_run(s, parse_spec({**base, "name": "strict", "resources": {"gpu": 0.5}}))[0]["id"]
            fallback = store.create_run(s, parse_spec({**base, "name": "fallback",
                                                       "resources": {"gpu": 0.5, "cpu_fallback": True}}))[0]["id"]
        engine.dispose()
        (tmp / "ray").mkdir()
        env = {**os.environ, "HOME": str(tmp), "RAY_TMPDIR": str(tmp / "ray"), "BITBENCH_DATA_DIR": str(tmp / "data"),
               "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
        for var in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):
            env.pop(var, None)
        proc = subprocess.run([sys.executable, "-c", DISPATCH, url, str(tmp / "tune")], cwd=ROOT, env=env, check=False,
                              capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stderr[-6000:]

        with TestClient(create_app(Settings(database_url=url, api_token=None))) as api:
            run = api.get(f"/runs/{strict}").json()
            (trial,) = api.get(f"/runs/{strict}/trials").json()
            assert run["status"] == "failed" and trial["status"] == "failed", (run, proc.stderr[-6000:])
            assert "NoCudaDeviceError" in trial["error"] and "asked for 0.5 GPU" in trial["error"]
            assert "no CUDA device" in run["error"] and "CUDA_VISIBLE_DEVICES=''" in trial["error"]
            assert trial["epochs_done"] == 0

            run = api.get(f"/runs/{fallback}").json()
            (trial,) = api.get(f"/runs/{fallback}/trials").json()
            assert run["status"] == "done", (run, proc.stderr[-6000:])
            # Ray assigned GPU 0, and reports the ids of it the worker can see: none
            assert trial["device"] == "cpu" and trial["provenance"]["ray_gpu_ids"] == []
            assert trial["provenance"]["device"] == "cpu" and trial["provenance"]["gpu"] is None
            assert [m["device"] for m in api.get(f"/trials/{trial['id']}").json()["metrics"]] == ["cpu"]

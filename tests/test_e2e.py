"""End to end: uvicorn and the dispatcher (with a local Ray) as real processes over one SQLite
file; runs are posted over HTTP and trained on the digits data set. Also: a dispatcher killed
mid-run is replaced and the run completes with every epoch stored exactly once; ``make run``
starts and one SIGINT stops everything."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, every: float = 0.5, procs=()):
    """Poll ``check()`` until it returns a truthy value; fail after ``timeout`` or if a process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for p in procs:
            assert p.alive(), f"{p.name} exited ({p.proc.returncode}) while waiting for {what}:\n{p.log_tail()}"
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def kill_group(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group()


class RunsClient:
    """``post`` a spec (202) and read a ``run`` through ``self.client`` (an httpx.Client on the API)."""

    client: httpx.Client

    def post(self, spec: dict) -> int:
        r = self.client.post("/runs", json=spec)
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def run(self, run_id: int) -> dict:
        r = self.client.get(f"/runs/{run_id}")
        assert r.status_code == 200, r.text
        return r.json()


class Stack(RunsClient):
    """The API and a dispatcher over one SQLite file, with short heartbeats."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        (tmp / "ray").mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "HOME": str(tmp), "RAY_TMPDIR": str(tmp / "ray"),  # Ray's sockets: a short path
            "RAY_OVERRIDE_RESOURCES": '{"CPU": 2}',  # the dispatcher's local Ray: num_cpus=2
            "DATABASE_URL": f"sqlite:///{tmp / 'e2e.sqlite'}", "BITBENCH_DATA_DIR": str(tmp / "data"),
            "BITBENCH_TUNE_DIR": str(tmp / "tune"), "BITBENCH_API_TOKEN": "",
            "BITBENCH_HEARTBEAT_S": "1", "BITBENCH_STALE_S": "4", "PYTHONUNBUFFERED": "1",
            "BITBENCH_REPORT_EVERY_S": "0",  # epoch by epoch: the kill tests' windows are counted in stored epochs
        }
        self.env.pop("RAY_ADDRESS", None)
        self.api = Proc("api", ["-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port",
                                str(self.port), "--log-level", "warning"], self.env, tmp)
        self.client = httpx.Client(base_url=self.base, timeout=30)
        wait_until(self._healthy, 120, "the API", procs=[self.api])
        self.dispatcher = self.start_dispatcher()

    def _healthy(self) -> bool:
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def start_dispatcher(self) -> Proc:
        return Proc("dispatcher", ["-m", "service.dispatcher", "--poll-seconds", "0.5"], self.env, self.tmp)


    def wait_finished(self, run_id: int) -> dict:
        def finished():
            run = self.run(run_id)
            return run if run["status"] in ("done", "failed", "cancelled") else None

        return wait_until(finished, RUN_TIMEOUT_S, f"run {run_id}", every=1, procs=[self.api, self.dispatcher])

    def close(self) -> None:
        self.client.close()
        self.dispatcher.stop()
        self.api.stop()


@pytest.fixture(scope="module")
def stack():
    with tempfile.TemporaryDirectory(prefix="bb-e2e-", dir="/tmp") as tmp:
        s = Stack(Path(tmp))
        try:
            yield s
        finally:
            s.close()


def check_epochs(stack: Stack, run_id: int, epochs: int) -> list[dict]:
    """Every trial done with epochs 1..E each stored once; returns the trials."""
    trials = stack.client.get(f"/runs/{run_id}/trials").json()
    for t in trials:
        assert t["status"] == "done", t
        assert t["epochs_done"] == epochs and 0 <= t["final_test_acc"] <= 1
        metrics = stack.client.get(f"/trials/{t['id']}").json()["metrics"]
        assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), t["key"]
    rows = list(csv.DictReader(io.StringIO(stack.client.get(f"/runs/{run_id}/export").text)))
    assert len(rows) == len(trials) * epochs
    assert max(Counter((r["trial_key"], r["epoch"]) for r in rows).values()) == 1
    return trials


def test_run_over_http(stack):
    spec = {"name": "e2e-small", "estimators": ["aqe", "ste"], "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}],
            "seeds": [0], "epochs": 2, "batch_size": 128}
    run_id = stack.post(spec)
    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    assert run["progress"]["done"] == 5 and run["epochs"] == {"done": 10, "total": 10}
    assert run["started_at"] and run["finished_at"] and run["error"] is None

    trials = check_epochs(stack, run_id, 2)
    assert {t["key"] for t in trials} == {"float-w32a32-s0", "aqe-w1a1-s0", "aqe-w2a2-s0", "ste-w1a1-s0",
                                          "ste-w2a2-s0"}
    metric = stack.client.get(f"/trials/{trials[1]['id']}").json()["metrics"][-1]
    assert metric["device"] == "cpu" and metric["images_per_s"] > 0 and "aqe.alpha" in json.dumps(metric["schedule"])

    board = stack.client.get("/leaderboard", params={"dataset": "digits", "model": "digits_net"}).json()
    cells = {(r["w_bits"], r["a_bits"], r["estimator_label"]): r for r in board}
    assert set(cells) == {(1, 1, "aqe"), (1, 1, "ste"), (2, 2, "aqe"), (2, 2, "ste"), (32, 32, "float")}
    assert all(r["n"] == 1 and r["rank"] >= 1 for r in board)
    assert stack.client.get(f"/dashboard/runs/{run_id}").status_code == 200


def test_named_methods_over_http(stack):
    """Two published methods at their own cells, one restricted to one cell, labelled by their names."""
    methods = {m["name"]: m for m in stack.client.get("/catalog").json()["methods"]}
    assert methods["bnn"]["estimator"] == "clipped_ste" and methods["twn"]["params"] == {"scale": "twn"}
    spec = {"name": "e2e-methods", "methods": ["bnn", {"name": "dorefa", "bits": [{"w": 1, "a": 2}]}],
            "seeds": [0], "epochs": 1, "include_full_precision": False}
    run_id = stack.post(spec)
    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    trials = check_epochs(stack, run_id, 1)
    assert {(t["key"], t["estimator"], t["estimator_label"]) for t in trials} == {
        ("bnn-w1a1-s0", "clipped_ste", "bnn"), ("dorefa-w1a2-s0", "dorefa", "dorefa")}
    board = stack.client.get("/leaderboard", params={"run_id": run_id}).json()
    assert {(r["w_bits"], r["a_bits"], r["estimator_label"]) for r in board} == {(1, 1, "bnn"), (1, 2, "dorefa")}


def test_killed_dispatcher_is_replaced_and_nothing_is_stored_twice(stack):
    epochs = 12  # a wide window (2 … 23 epochs stored) to kill the dispatcher in, even on a loaded machine
    spec = {"name": "e2e-resume", "estimators": ["aqe", "ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0],
            "epochs": epochs, "include_full_precision": False, "batch_size": 64}
    run_id = stack.post(spec)
    total = 2 * epochs
    def progressed():
        return 2 <= stack.run(run_id)["epochs"]["done"] < total

    wait_until(progressed, RUN_TIMEOUT_S, "some epochs of the second run", every=0.2,
               procs=[stack.api, stack.dispatcher])
    stack.dispatcher.kill_group()  # SIGKILL: the dispatcher and its Ray, mid-run
    killed_at = stack.run(run_id)
    assert killed_at["status"] == "running" and killed_at["epochs"]["done"] < total

    stack.dispatcher = stack.start_dispatcher()  # requeues the stale run, restores the Tune experiment
    run = stack.wait_finished(run_id)
    assert run["status"] == "done", (run, stack.dispatcher.log_tail())
    assert run["epochs"] == {"done": total, "total": total}
    trials = check_epochs(stack, run_id, epochs)
    # a trial unfinished at the kill started again (an attempt more) under the new dispatcher
    assert {t["key"] for t in trials} == {"aqe-w1a1-s0", "ste-w1a1-s0"}
    assert any(t["attempts"] >= 2 for t in trials), trials


def test_make_run_starts_everything_and_one_sigint_stops_it():
    with tempfile.TemporaryDirectory(prefix="bb-run-", dir="/tmp") as tmp:
        port = free_port()
        env = {**os.environ, "HOME": tmp, "RAY_TMPDIR": tmp, "RAY_OVERRIDE_RESOURCES": '{"CPU": 2}',
               "BITBENCH_DATA_DIR": tmp, "BITBENCH_PORT": str(port), "PYTHONUNBUFFERED": "1", "BITBENCH_API_TOKEN": ""}
        for var in ("DATABASE_URL", "BITBENCH_TUNE_DIR", "RAY_ADDRESS"):
            env.pop(var, None)
        log = Path(tmp, "run.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "service.run"], cwd=ROOT, env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "dashboard:" in log.read_text(), 180, "make run's URLs", every=0.5)
            text = log.read_text()
            assert f"http://127.0.0.1:{port}/dashboard" in text and "demo: run 1 (63 trials) queued" in text
            runs = httpx.get(f"http://127.0.0.1:{port}/runs").json()
            assert runs["total"] == 1 and runs["items"][0]["trial_count"] == 63
            assert Path(tmp, "bitbench.sqlite").exists()
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/runs/1").json()["epochs"]["done"] > 0, 300,
                       "the demo's first epoch")
            assert len(_processes_under(tmp)) > 4  # service.run, api, dispatcher, Ray's processes

            proc.send_signal(signal.SIGINT)
            assert proc.wait(90) == 0, log.read_text()[-3000:]
            wait_until(lambda: not _processes_under(tmp), 10, "every child to exit")
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/healthz")
        finally:
            if proc.poll() is None:
                proc.kill()
            for pid in _processes_under(tmp):
                os.kill(pid, signal.SIGKILL)


def _processes_under(tmp: str) -> list[int]:
    """Live processes whose environment has ``BITBENCH_DATA_DIR=tmp``: service.run and all it started."""
    marker = f"BITBENCH_DATA_DIR={tmp}".encode()
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "environ").read_bytes().split(b"\0") \
                    and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(d.name))
        except OSError:
            pass
    return found

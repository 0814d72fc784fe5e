"""The dispatcher's loop with a fake ``run_sweep``, on SQLite and PostgreSQL: claim → sink →
finish, failures, cancel and heartbeat loss reaching the stop flag, resuming a dead holder's
run, clean shutdown; and the ``python -m service.dispatcher`` process itself."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from service import store
from service.config import Settings
from service.dispatcher import Dispatcher
from service.sink import SqlSink
from service.tables import metrics, runs
from workers.spec import parse_spec

pytestmark = pytest.mark.timeout(120)
EPOCHS = 2


def small_spec(name="d"):
    return parse_spec({"name": name, "estimators": ["ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0, 1],
                       "epochs": EPOCHS})  # 4 trials: float and ste, two seeds


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


class FakeSweep:
    """Stands in for ``workers.sweep.run_sweep``: trains nothing, reports like it does.

    ``hold`` waits for the stop flag before the first trial; trials not yet run when it is
    raised end "cancelled". ``fail`` keys end "failed"; ``replay`` re-sends epochs from 1."""

    def __init__(self, *, fail=(), hold=False, raises=None):
        self.fail, self.hold, self.raises = set(fail), hold, raises
        self.calls: list[dict] = []
        self.stop_seen_at: float | None = None
        self.started = threading.Event()

    def __call__(self, spec, sink, *, stop_requested, storage_path, experiment_name, skip_keys, ray_address,
                 data_dir):
        self.calls.append({"storage_path": storage_path, "experiment_name": experiment_name,
                           "skip_keys": sorted(skip_keys), "ray_address": ray_address, "data_dir": data_dir})
        self.started.set()
        if self.raises:
            raise self.raises
        if self.hold:
            end = time.monotonic() + 30
            while not stop_requested() and time.monotonic() < end:
                time.sleep(0.01)
            self.stop_seen_at = time.monotonic()
        statuses = {}
        for t in spec.trials():
            if t.key in skip_keys:
                statuses[t.key] = "skipped"
                continue
            if stop_requested():
                sink.on_trial_end(t.key, "cancelled", None, None)
                statuses[t.key] = "cancelled"
                continue
            sink.on_trial_start(t.key, {"device": "cpu", "attempt": 1})
            for e in range(1, EPOCHS + 1):
                sink.on_epoch(t.key, {"epoch": e, "train_loss": 1.0, "train_acc": 0.5, "val_acc": 0.5,
                                      "test_acc": 0.5, "lr": 0.01, "epoch_seconds": 0.01, "images_per_s": 1.0,
                                      "device": "cpu", "schedule": {}})
            if t.key in self.fail:
                sink.on_trial_end(t.key, "failed", None, "Traceback …\nRuntimeError: boom")
                statuses[t.key] = "failed"
            else:
                sink.on_trial_end(t.key, "done", {"final_test_acc": 0.9, "final_val_acc": 0.9,
                                                  "best_val_acc": 0.91}, None)
                statuses[t.key] = "done"
        return statuses


@pytest.fixture
def settings(db_url, tmp_path):
    return Settings(database_url=db_url, heartbeat_s=0.1, stale_s=30, tune_dir=tmp_path / "tune")


def make_dispatcher(sessions, settings, sweep, worker_id="disp-1"):
    return Dispatcher(sessions, settings, worker_id=worker_id, run_sweep=sweep)


def run_in_thread(d: Dispatcher) -> threading.Thread:
    t = threading.Thread(target=d.run_once, daemon=True)
    t.start()
    return t


def n_metrics(session):
    return session.execute(select(func.count()).select_from(metrics)).scalar_one()


def test_claims_runs_and_finishes_them(sessions, session, settings):
    first = store.create_run(session, small_spec("a"))[0]["id"]
    second = store.create_run(session, small_spec("b"))[0]["id"]
    sweep = FakeSweep()
    d = make_dispatcher(sessions, settings, sweep)
    assert d.run_once() == first
    run = store.get_run(session, first)
    assert run["status"] == "done" and run["finished_at"] and run["error"] is None
    assert run["progress"]["done"] == 4 and n_metrics(session) == 4 * EPOCHS
    assert all(t["epochs_done"] == EPOCHS and t["final_test_acc"] == 0.9 for t in store.list_trials(session, first))
    assert sweep.calls[0] == {"storage_path": str(settings.tune_dir), "experiment_name": f"run-{first}",
                              "skip_keys": [], "ray_address": None, "data_dir": None}
    assert os.path.isabs(sweep.calls[0]["storage_path"])
    d.serve(once=True)
    assert store.get_run(session, second)["status"] == "done"
    assert d.run_once() is None


def test_a_failed_trial_fails_the_run(sessions, session, settings):
    rid = store.create_run(session, small_spec())[0]["id"]
    make_dispatcher(sessions, settings, FakeSweep(fail={"ste-w1a1-s1"})).run_once()
    run = store.get_run(session, rid)
    assert run["status"] == "failed" and run["progress"] == {"queued": 0, "running": 0, "done": 3, "failed": 1,
                                                            "cancelled": 0}
    assert run["error"] == "1 of 4 trials failed: ste-w1a1-s1: RuntimeError: boom"


def test_run_sweep_raising_fails_the_run(sessions, session, settings):
    rid = store.create_run(session, small_spec())[0]["id"]
    make_dispatcher(sessions, settings, FakeSweep(raises=RuntimeError("ray is down"))).run_once()
    run = store.get_run(session, rid)
    assert run["status"] == "failed" and "RuntimeError: ray is down" in run["error"]
    assert run["progress"]["cancelled"] == 4


def test_cancel_reaches_the_stop_flag_within_seconds(sessions, session, settings):
    rid = store.create_run(session, small_spec())[0]["id"]
    sweep = FakeSweep(hold=True)
    worker = run_in_thread(make_dispatcher(sessions, settings, sweep))
    assert sweep.started.wait(20)
    asked = time.monotonic()
    assert store.request_cancel(session, rid)["cancel_requested"]
    worker.join(20)
    assert not worker.is_alive() and sweep.stop_seen_at - asked < 5.0
    run = store.get_run(session, rid)
    assert run["status"] == "cancelled" and run["progress"]["cancelled"] == 4 and run["finished_at"]


def test_losing_the_claim_stops_without_finishing(sessions, session, settings):
    rid = store.create_run(session, small_spec())[0]["id"]
    sweep = FakeSweep(hold=True)
    worker = run_in_thread(make_dispatcher(sessions, settings, sweep, worker_id="slow"))
    assert sweep.started.wait(20)
    # another dispatcher decided "slow" was dead and took the run over
    assert store.requeue_stale(session, -5) == [rid]
    taken = time.monotonic()
    assert store.claim_run(session, "other")["id"] == rid
    worker.join(20)
    assert not worker.is_alive() and sweep.stop_seen_at - taken < 5.0
    run = session.execute(select(runs.c.status, runs.c.worker_id).where(runs.c.id == rid)).one()
    assert tuple(run) == ("running", "other")


def test_a_new_dispatcher_resumes_a_dead_ones_run(sessions, session, settings):
    rid = store.create_run(session, small_spec())[0]["id"]
    # the dead dispatcher finished two trials and one epoch of a third, then was SIGKILLed
    assert store.claim_run(session, "killed")["id"] == rid
    sink = SqlSink(sessions, rid)
    keys = [t.key for t in small_spec().trials()]
    for key in keys[:2]:
        sink.on_trial_start(key, {"device": "cpu", "attempt": 1})
        for e in range(1, EPOCHS + 1):
            sink.on_epoch(key, {"epoch": e, "test_acc": 0.7})
        sink.on_trial_end(key, "done", {"final_test_acc": 0.7}, None)
    sink.on_trial_start(keys[2], {"device": "cpu", "attempt": 1})
    sink.on_epoch(keys[2], {"epoch": 1, "test_acc": 0.1})

    settings = settings.model_copy(update={"stale_s": 1.0})
    sweep = FakeSweep()
    d = make_dispatcher(sessions, settings, sweep, worker_id="fresh")
    assert d.run_once() is None  # the heartbeat is not stale yet
    session.execute(update(runs).where(runs.c.id == rid).values(
        heartbeat_at=datetime.now().astimezone() - timedelta(seconds=5)))
    session.commit()
    assert d.run_once() == rid
    assert sweep.calls[0]["skip_keys"] == sorted(keys[:2]) and sweep.calls[0]["experiment_name"] == f"run-{rid}"
    run = store.get_run(session, rid)
    assert run["status"] == "done" and run["progress"]["done"] == 4
    assert n_metrics(session) == 4 * EPOCHS  # epoch 1 of the third trial was replayed, stored once
    third = store.get_trial(session, store.trial_ids(session, rid)[keys[2]])
    assert third["attempts"] == 2 and third["metrics"][0]["test_acc"] == 0.1


def test_shutdown_hands_the_run_back(sessions, session, settings):
    rid = store.create_run(session, small_spec())[0]["id"]
    sweep = FakeSweep(hold=True)
    d = make_dispatcher(sessions, settings, sweep)
    worker = run_in_thread(d)
    assert sweep.started.wait(20)
    d.shutdown.set()  # what SIGTERM does
    worker.join(20)
    run = store.get_run(session, rid)
    assert run["status"] == "queued" and run["progress"]["queued"] == 4  # stopped trials queue again
    assert make_dispatcher(sessions, settings, FakeSweep(), "next").run_once() == rid
    assert store.get_run(session, rid)["status"] == "done"


def _dispatcher_env(db_url, tmp_path):
    return {**os.environ, "DATABASE_URL": db_url, "BITBENCH_TUNE_DIR": str(tmp_path / "tune"),
            "PYTHONPATH": os.getcwd()}


def test_module_once_on_an_empty_queue_migrates_and_exits(db_url, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "service.dispatcher", "--once"], env=_dispatcher_env(db_url, tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from service.db import current_revision, head_revision, make_engine

    eng = make_engine(db_url)
    assert current_revision(eng) == head_revision()
    eng.dispose()


def test_module_stops_cleanly_on_sigterm(db_url, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "service.dispatcher", "--poll-seconds", "0.2"],
                            env=_dispatcher_env(db_url, tmp_path), stderr=subprocess.PIPE, text=True)
    log = []
    for line in proc.stderr:  # wait until it polls
        log.append(line)
        if "polling every" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, "".join(log) + proc.stderr.read()


# -- joining Ray -----------------------------------------------------------------------------
def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_cluster_is_retried_with_back_off_and_fails_no_run(db_url, tmp_path, session):
    """RAY_ADDRESS names a port nothing listens on: the dispatcher says so, waits 1, 2, 4 … s between
    tries, claims nothing (the run stays queued, no trial starts), and a SIGTERM still stops it at once."""
    rid = store.create_run(session, small_spec())[0]["id"]
    address = f"127.0.0.1:{closed_port()}"
    env = {**_dispatcher_env(db_url, tmp_path), "RAY_ADDRESS": address}
    proc = subprocess.Popen([sys.executable, "-m", "service.dispatcher", "--poll-seconds", "0.2"], env=env,
                            stderr=subprocess.PIPE, text=True)
    log: list[str] = []

    def read_log():
        for line in proc.stderr:
            log.append(line)

    def errors() -> list[str]:
        return [line for line in log if " ERROR " in line]

    threading.Thread(target=read_log, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while len(errors()) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        first = errors()[:3]
        assert len(first) == 3, "".join(log)
        assert all(f"the Ray cluster at {address} (RAY_ADDRESS) does not answer" in e for e in first), first
        assert [e.rsplit("retrying in ", 1)[1].strip() for e in first] == ["1 s", "2 s", "4 s"]
        session.expire_all()
        run = session.execute(select(runs.c.status, runs.c.worker_id, runs.c.started_at, runs.c.error)
                              .where(runs.c.id == rid)).one()
        assert tuple(run) == ("queued", None, None, None)
        assert {(t["status"], t["attempts"]) for t in store.list_trials(session, rid)} == {("queued", 0)}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, "".join(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_refused_join_names_ray_s_reason_and_the_token():
    """Ray wraps a refused token in ConnectionError("Failed to connect …"): the log names the cause."""
    from service.dispatcher import probe_target, root_cause

    inner = RuntimeError("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                         "  File \"node.py\", line 996\nray.exceptions.AuthenticationError: RPC error: "
                         "InvalidAuthToken: Authentication token is missing or incorrect.\n")
    try:
        try:
            raise inner
        except RuntimeError as e:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from e
    except ConnectionError as outer:
        assert root_cause(outer) == ("ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: "
                                     "Authentication token is missing or incorrect.")
    assert root_cause(ValueError("x" * 500), limit=10) == "x" * 9 + "…"
    assert probe_target("ray-head:6379") == "ray-head:6379"
    assert probe_target("ray://10.0.0.5:10001") == "10.0.0.5:10001"
    assert probe_target("[::1]:6379") == "[::1]:6379"
    assert probe_target("auto") is None and probe_target(None) is None and probe_target("") is None

"""A dispatcher whose Ray goes away mid-run hands the run back within seconds: with a fake sweep
stuck the way a real one is (its main thread inside Ray), with a process that dies at once holding
a run (as Ray's core worker ends a driver whose raylet went first) and its hand-back helper, and
with a real dispatcher process and a local Ray whose whole process group gets SIGTERM (systemd's
default kill mode)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from service import dispatcher as dispatcher_module
from service import store
from service.config import Settings
from service.db import make_engine, migrate, session_factory
from service.dispatcher import Dispatcher
from service.tables import metrics, runs, trials
from workers.spec import parse_spec

pytestmark = pytest.mark.timeout(600)


class StuckSweep:
    """Starts its trials, then ignores the stop flag until ``unstick``: a sweep whose Ray is gone."""

    def __init__(self):
        self.started, self.unstick = threading.Event(), threading.Event()

    def __call__(self, spec, sink, *, stop_requested, **_):
        for t in spec.trials():
            sink.on_trial_start(t.key, {"device": "cpu", "attempt": 1})
            sink.on_epoch(t.key, {"epoch": 1, "test_acc": 0.5})
        self.started.set()
        self.unstick.wait(60)
        return {}


class Ray:
    """The watchdog's probe: alive until ``die()``; the exit codes the dispatcher asked for."""

    def __init__(self):
        self.alive, self.exits, self.exited = True, [], threading.Event()

    def probe(self) -> bool:
        return self.alive

    def exit(self, code: int) -> None:
        self.exits.append(code)
        self.exited.set()


def start(sessions, settings, ray: Ray) -> tuple[int, StuckSweep, threading.Thread, Dispatcher]:
    with sessions() as s:
        run_id = store.create_run(s, parse_spec({"name": "ray-dies", "estimators": ["ste"], "bits": [{"w": 1, "a": 1}],
                                                 "seeds": [0], "epochs": 3}))[0]["id"]
    sweep = StuckSweep()
    d = Dispatcher(sessions, settings, worker_id="d1", run_sweep=sweep, ray_alive=ray.probe, exit_process=ray.exit)
    worker = threading.Thread(target=d.run_once, daemon=True)
    worker.start()
    assert sweep.started.wait(30)
    return run_id, sweep, worker, d


@pytest.fixture
def settings(db_url, tmp_path):
    return Settings(database_url=db_url, heartbeat_s=0.2, stale_s=300, tune_dir=tmp_path / "tune")


def status(sessions, run_id) -> tuple[str, str | None]:
    with sessions() as s:
        return tuple(s.execute(select(runs.c.status, runs.c.worker_id).where(runs.c.id == run_id)).one())


def test_ray_gone_after_a_stop_signal_hands_the_run_back_at_once(sessions, settings):
    ray = Ray()
    run_id, sweep, worker, d = start(sessions, settings, ray)
    d.shutdown.set()  # SIGTERM to the process group: the dispatcher's handler …
    time.sleep(0.5)
    assert status(sessions, run_id) == ("running", "d1") and not ray.exits  # … Ray still answers: wait for it
    ray.alive = False  # … and Ray dies with it
    assert ray.exited.wait(5) and ray.exits == [0]
    assert status(sessions, run_id) == ("queued", None)
    with sessions() as s:
        assert {t["status"] for t in store.list_trials(s, run_id)} == {"queued"}
        assert len(s.execute(select(metrics)).all()) == 2  # the finished epochs stay
    sweep.unstick.set()
    worker.join(30)
    assert status(sessions, run_id) == ("queued", None)


def test_ray_gone_without_a_signal_hands_the_run_back_after_a_grace(sessions, settings, monkeypatch):
    monkeypatch.setattr(dispatcher_module, "RAY_LOST_S", 1.0)
    ray = Ray()
    run_id, sweep, worker, d = start(sessions, settings, ray)
    ray.alive = False
    assert ray.exited.wait(10) and ray.exits == [1]  # not a clean stop: a supervisor restarts it
    assert status(sessions, run_id) == ("queued", None)
    sweep.unstick.set()
    worker.join(30)
    assert status(sessions, run_id) == ("queued", None)


def test_a_sweep_that_ignores_a_stop_signal_is_handed_back_after_the_deadline(sessions, settings, monkeypatch):
    """Ray's GCS still answers but the sweep does not stop (the group's SIGTERM killed Ray's workers and Tune
    blocks recovering their objects): the run goes back to the queue STOP_DEADLINE_S after the signal."""
    monkeypatch.setattr(dispatcher_module, "STOP_DEADLINE_S", 1.0)
    ray = Ray()
    run_id, sweep, worker, d = start(sessions, settings, ray)
    d.shutdown.set()
    time.sleep(0.4)
    assert status(sessions, run_id) == ("running", "d1") and not ray.exits  # within the deadline: wait
    assert ray.exited.wait(5) and ray.exits == [0]
    assert status(sessions, run_id) == ("queued", None)
    sweep.unstick.set()
    worker.join(30)
    assert status(sessions, run_id) == ("queued", None)


def test_ray_gone_between_runs_ends_the_process_after_a_grace(sessions, settings, monkeypatch):
    """An idle dispatcher whose Ray's GCS stops answering says so and exits 1 (a restart joins the new
    cluster; a Ray driver cannot in-process), RAY_LOST_S after the first probe that failed."""
    monkeypatch.setattr(dispatcher_module, "RAY_LOST_S", 0.5)
    ray = Ray()
    d = Dispatcher(sessions, settings, worker_id="d1", run_sweep=StuckSweep(), ray_alive=ray.probe,
                   exit_process=ray.exit)
    idle = threading.Thread(target=d.serve, kwargs={"poll_s": 0.05}, daemon=True)
    idle.start()
    try:
        assert not ray.exited.wait(1.0)  # the GCS answers: it waits for runs
        ray.alive = False
        assert ray.exited.wait(10) and ray.exits[0] == 1
    finally:
        d.shutdown.set()
        idle.join(10)


HOLDER = """
import sys, time
from service import store
from service.db import make_engine, session_factory
from service.dispatcher import HandBack
url, worker = sys.argv[1], sys.argv[2]
with session_factory(make_engine(url))() as s:
    run = store.claim_run(s, worker)
HandBack(url, run["id"], worker)
print(run["id"], flush=True)
time.sleep(600)
"""


def test_a_group_sigterm_that_ends_the_dispatcher_at_once_still_requeues_its_run(db_url, sessions, tmp_path):
    """Ray's core worker ends a driver at once (no Python runs) when its raylet goes first, as a group
    SIGTERM can make it: the HandBack helper, deaf to that SIGTERM, hands the run back within seconds."""
    with sessions() as s:
        run_id = store.create_run(s, parse_spec(spec("orphaned", 3)))[0]["id"]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, db_url, "holder-1"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True, cwd=Path(__file__).resolve().parents[1],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == str(run_id)
        assert status(sessions, run_id) == ("running", "holder-1")
        # at once: the helper is still importing, with the signals blocked since its fork
        os.killpg(holder.pid, signal.SIGTERM)  # the holder dies of it; its helper, in the same group, does not
        assert holder.wait(10) == -signal.SIGTERM
        deadline = time.monotonic() + 30
        while status(sessions, run_id) != ("queued", None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(sessions, run_id) == ("queued", None)
        with sessions() as s:
            assert {t["status"] for t in store.list_trials(s, run_id)} == {"queued"}
    finally:
        try:
            os.killpg(holder.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_concluded_run_is_left_alone_by_the_hand_back_helper(db_url, sessions):
    with sessions() as s:
        run_id = store.create_run(s, parse_spec(spec("concluded", 3)))[0]["id"]
        store.claim_run(s, "d1")
    helper = dispatcher_module.HandBack(db_url, run_id, "d1")
    helper.proc.send_signal(signal.SIGTERM)  # ignored
    with sessions() as s:
        store.finish_run(s, run_id, "failed", "boom", worker_id="d1")
    helper.close()
    assert helper.proc.returncode == 0
    assert status(sessions, run_id)[0] == "failed"


def test_a_gcs_probe_is_a_tcp_connect():
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert dispatcher_module.reachable(address)
    assert not dispatcher_module.reachable(address)
    assert dispatcher_module.gcs_address() is None or ":" in dispatcher_module.gcs_address()


# -- a real dispatcher process and its local Ray -----------------------------------------------
EPOCHS = 12


def spec(name: str, epochs: int) -> dict:
    return {"name": name, "estimators": ["ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0, 1], "epochs": epochs,
            "include_full_precision": False, "batch_size": 64}


@pytest.mark.slow
def test_sigterm_to_the_process_group_requeues_the_run_within_seconds():
    from tests.test_e2e import Proc, wait_until

    with tempfile.TemporaryDirectory(prefix="bb-rayd-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "ray").mkdir()
        url = f"sqlite:///{tmp / 'd.sqlite'}"
        engine = make_engine(url)
        migrate(engine)
        sessions = session_factory(engine)
        with sessions() as s:
            first = store.create_run(s, parse_spec(spec("first", 1)))[0]["id"]
            run_id = store.create_run(s, parse_spec(spec("killed", EPOCHS)))[0]["id"]
        env = {**os.environ, "HOME": str(tmp), "RAY_TMPDIR": str(tmp / "ray"), "RAY_OVERRIDE_RESOURCES": '{"CPU": 2}',
               "DATABASE_URL": url, "BITBENCH_DATA_DIR": str(tmp / "data"), "BITBENCH_TUNE_DIR": str(tmp / "tune"),
               "BITBENCH_HEARTBEAT_S": "1", "BITBENCH_STALE_S": "300", "PYTHONUNBUFFERED": "1",
               "BITBENCH_REPORT_EVERY_S": "0"}  # epoch by epoch: the kill's window is counted in stored epochs
        env.pop("RAY_ADDRESS", None)

        def rows() -> list[tuple[str, int, float]]:
            with sessions() as s:
                return [tuple(r) for r in s.execute(
                    select(trials.c.key, metrics.c.epoch, metrics.c.test_acc)
                    .join(trials, trials.c.id == metrics.c.trial_id).where(trials.c.run_id == run_id))]

        disp = Proc("dispatcher", ["-m", "service.dispatcher", "--poll-seconds", "0.5"], env, tmp)
        try:
            # the second run: Ray was started by the first, SIGTERM finds the dispatcher's own handler
            wait_until(lambda: status(sessions, first)[0] == "done" and len(rows()) >= 2, 400,
                       "two epochs of the second run", every=0.2, procs=[disp])
            os.killpg(disp.proc.pid, signal.SIGTERM)  # systemd's KillMode=control-group
            killed = time.monotonic()
            try:
                wait_until(lambda: status(sessions, run_id) == ("queued", None), 15, "the run back in the queue",
                           every=0.1)
            except pytest.fail.Exception:
                pytest.fail(f"run {status(sessions, run_id)} 15 s after the kill; the dispatcher's log:\n"
                            f"{disp.log_tail(12000)}")
            code = disp.proc.wait(15)
            # 0: the dispatcher handed the run back itself; 1: Ray's core worker ended it first (the raylet's
            # object store went before the GCS) and the HandBack helper requeued the run
            assert code == 0 or (code == 1 and "ended holding it; requeued" in disp.log_tail()), disp.log_tail()
            assert time.monotonic() - killed < 15
            kept = rows()
            assert len(kept) < 2 * EPOCHS

            disp = Proc("dispatcher", ["-m", "service.dispatcher", "--poll-seconds", "0.5"], env, tmp)
            wait_until(lambda: status(sessions, run_id)[0] == "done", 400, "the run resumed and done", every=0.5,
                       procs=[disp])
            final = rows()
            assert sorted((key, epoch) for key, epoch, _ in final) == sorted(
                (f"ste-w1a1-s{seed}", e) for seed in (0, 1) for e in range(1, EPOCHS + 1))  # each epoch once
            assert set(kept) <= set(final)  # nothing stored before the kill was lost or rewritten
            with sessions() as s:
                assert [t["epochs_done"] for t in store.list_trials(s, run_id)] == [EPOCHS, EPOCHS]
        finally:
            disp.stop()
            engine.dispose()

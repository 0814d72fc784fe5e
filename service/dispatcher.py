"""The dispatcher: takes queued runs from the database and runs them on Ray Tune.

``python -m service.dispatcher [--once] [--poll-seconds N] [--worker-id ID]``

Loop: migrate the database; requeue runs whose holder stopped heart-beating
(``BITBENCH_STALE_S``); claim the oldest queued run; while ``workers.sweep.run_sweep`` trains it
into a ``SqlSink``, a thread refreshes the claim every ``BITBENCH_HEARTBEAT_S`` and raises the
stop flag when a cancel is requested or the claim was lost; then the run ends as ``done`` (every
trial done), ``cancelled`` or ``failed`` (with the error). A restarted or second dispatcher resumes
a run a dead one held: finished trials are skipped, the Tune experiment ``run-<id>`` under
``BITBENCH_TUNE_DIR`` is restored, stored epochs are never written twice.

SIGTERM / SIGINT: stop the current run's trials, hand the run back to the queue (unless it
finished), exit; a second signal stops at once. ``--once`` handles at most one run and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import traceback
import uuid
from typing import Callable

from sqlalchemy.orm import sessionmaker

from workers.storage import ensure_exists

from . import store
from .config import Settings, get_settings
from .db import make_engine, migrate, session_factory
from .sink import SqlSink
from .tables import FINISHED

log = logging.getLogger("bitbench.dispatcher")


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _load_run_sweep() -> Callable:
    from workers.sweep import run_sweep

    return run_sweep


class Dispatcher:
    """Claims and runs queued runs; ``shutdown`` (an Event) stops it between and inside runs.

    ``run_sweep`` defaults to ``workers.sweep.run_sweep`` (tests pass a fake)."""

    def __init__(self, sessions: sessionmaker, settings: Settings, *, worker_id: str | None = None,
                 run_sweep: Callable | None = None):
        self.sessions = sessions
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self._run_sweep = run_sweep
        self.shutdown = threading.Event()
        self._signals_installed = False

    # -- loop ---------------------------------------------------------------------------------
    def serve(self, *, once: bool = False, poll_s: float = 2.0) -> None:
        """Run queued runs until ``shutdown`` (or, with ``once``, after one claim attempt)."""
        log.info("dispatcher %s polling every %.1f s", self.worker_id, poll_s)
        while not self.shutdown.is_set():
            handled = self.run_once()
            if self._signals_installed:
                self.install_signal_handlers()  # ray.init replaces the SIGTERM handler
            if once:
                return
            if handled is None:
                self.shutdown.wait(poll_s)

    def run_once(self) -> int | None:
        """Requeue stale runs, claim one and run it to its end; returns its id (None: queue empty)."""
        with self.sessions() as s:
            for rid in store.requeue_stale(s, self.settings.stale_s):
                log.warning("run %s: holder's heartbeat is stale, requeued", rid)
            run = store.claim_run(s, self.worker_id)
        if run is None:
            return None
        self.execute(run)
        return run["id"]

    # -- one run ------------------------------------------------------------------------------
    def execute(self, run: dict) -> None:
        """Train a claimed run with heartbeats and the stop flag, then record how it ended."""
        run_id = run["id"]
        stop, lost, cancelled, over = (threading.Event() for _ in range(4))
        beat = threading.Thread(target=self._heartbeat, args=(run_id, stop, lost, cancelled, over),
                                name=f"heartbeat-run-{run_id}", daemon=True)
        beat.start()
        results, error, interrupted = {}, None, None
        try:
            from workers.spec import parse_spec

            spec = parse_spec(run["spec"], max_trials_limit=max(run["trial_count"], 1))
            with self.sessions() as s:
                done = [t["key"] for t in store.list_trials(s, run_id) if t["status"] == "done"]
            log.info("run %s (%s): %d trials, %d already done", run_id, run["name"], run["trial_count"], len(done))
            ensure_exists(self.settings.tune_dir)
            run_sweep = self._run_sweep or _load_run_sweep()
            results = run_sweep(
                spec, SqlSink(self.sessions, run_id),
                stop_requested=lambda: stop.is_set() or self.shutdown.is_set(),
                storage_path=self.settings.tune_dir, experiment_name=f"run-{run_id}",
                skip_keys=done, ray_address=self.settings.ray_address,
                data_dir=str(self.settings.data_dir) if self.settings.data_dir else None,
            ) or {}
        except (KeyboardInterrupt, SystemExit) as exc:  # a second signal, or Ray's own SIGTERM handler
            interrupted = exc
            self.shutdown.set()
        except Exception:
            error = traceback.format_exc(limit=20)
            log.error("run %s: run_sweep raised\n%s", run_id, error)
        finally:
            over.set()
            beat.join()
        self._conclude(run_id, results, error, lost=lost.is_set(), cancelled=cancelled.is_set())
        if interrupted is not None:
            raise interrupted

    def _heartbeat(self, run_id, stop, lost, cancelled, over) -> None:
        while True:
            try:
                with self.sessions() as s:
                    if not store.heartbeat(s, run_id, self.worker_id):
                        log.warning("run %s: claim lost, stopping", run_id)
                        lost.set()
                        stop.set()
                        return
                    if not cancelled.is_set() and store.cancel_requested(s, run_id):
                        log.info("run %s: cancel requested, stopping", run_id)
                        cancelled.set()
                        stop.set()
            except Exception:  # the database is unreachable for now: staleness decides
                log.exception("run %s: heartbeat failed", run_id)
            if over.wait(self.settings.heartbeat_s):
                return

    def _conclude(self, run_id: int, results: dict, error: str | None, *, lost: bool, cancelled: bool) -> None:
        if lost:  # requeued or claimed by another dispatcher: not ours to finish
            log.warning("run %s: left to its new holder", run_id)
            return
        with self.sessions() as s:
            trials = {t["key"]: t for t in store.list_trials(s, run_id)}
            for key, status in results.items():  # failures Tune saw but the sink never heard of
                t = trials.get(key)
                if t and status in ("failed", "cancelled") and t["status"] not in FINISHED:
                    store.record_trial_end(s, t["id"], status, None, f"{status} in Ray Tune without a result")
                    t["status"] = status
            statuses = [t["status"] for t in trials.values()]
            failed = [t for t in trials.values() if t["status"] == "failed"]
            if all(st == "done" for st in statuses):
                outcome, why = "done", None
            elif cancelled or store.cancel_requested(s, run_id):
                outcome, why = "cancelled", "cancelled on request"
            elif self.shutdown.is_set() and error is None:
                if store.release_run(s, run_id, self.worker_id):
                    log.info("run %s: dispatcher stopping, run requeued", run_id)
                return
            elif error is not None:
                outcome, why = "failed", error
            elif failed:
                shown = "; ".join(f"{t['key']}: {(t['error'] or 'failed').strip().splitlines()[-1]}" for t in failed[:5])
                outcome, why = "failed", f"{len(failed)} of {len(statuses)} trials failed: {shown}"
            else:
                unfinished = sum(st not in FINISHED for st in statuses)
                outcome, why = "failed", f"run_sweep returned with {unfinished} of {len(statuses)} trials unfinished"
            if store.finish_run(s, run_id, outcome, why, worker_id=self.worker_id):
                log.info("run %s: %s%s", run_id, outcome, f" ({why.splitlines()[0]})" if why else "")

    # -- signals ------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT set ``shutdown``; a second one raises KeyboardInterrupt (main thread only)."""
        def handle(signum, _frame):
            if self.shutdown.is_set():
                raise KeyboardInterrupt
            log.info("signal %s: finishing up (send again to stop at once)", signal.Signals(signum).name)
            self.shutdown.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handle)
        self._signals_installed = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.dispatcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--once", action="store_true", help="handle at most one queued run, then exit")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="wait between polls of an empty queue")
    parser.add_argument("--worker-id", default=None, help="name of this dispatcher in runs.worker_id")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # our stop flag, not Tune's own SIGINT handler, ends a sweep
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    settings = get_settings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    dispatcher = Dispatcher(session_factory(engine), settings, worker_id=args.worker_id)
    dispatcher.install_signal_handlers()
    try:
        dispatcher.serve(once=args.once, poll_s=args.poll_seconds)
    except KeyboardInterrupt:
        log.info("stopped")
        return 130
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

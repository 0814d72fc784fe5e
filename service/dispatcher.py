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

Ray going away: while a run is in flight a watchdog thread probes Ray's GCS (a TCP connect).
When it stops answering — at once after a stop signal (a local Ray dies with the dispatcher when
the whole process group gets SIGTERM, as systemd's default kill mode does), after ``RAY_LOST_S``
without one — the watchdog hands the run back to the queue and ends the process (exit 0 after a
signal, 1 otherwise); the main thread cannot, as Ray retries the GCS for 60 s inside the sweep and
then ends the process itself. The same happens when the sweep has not stopped ``STOP_DEADLINE_S``
after a stop signal (seen when the group's SIGTERM kills Ray's workers but not yet its GCS: the
sweep blocks recovering their objects). Finished epochs are in the database, the Tune experiment
resumes, and nothing is stored twice.
Exit handlers (Ray's shutdown, which waits on the same dead GCS) get at most ``EXIT_GRACE_S``.

Ending without a word: Ray's core worker ends the dispatcher at once (exit 1, no Python runs) when
the local raylet's object store goes away — a group SIGTERM often kills the raylet before the
GCS, so the watchdog is too late — and SIGKILL or the OOM killer do the same. So while a run with
Ray is in flight, a helper process (:class:`HandBack`, ``--hand-back``), deaf to SIGTERM and
SIGINT, waits on a pipe from the dispatcher; when the pipe closes with the dispatcher still
holding the run, it hands the run back to the queue at once, without waiting for ``BITBENCH_STALE_S``.

Joining Ray: before it claims a run, the dispatcher joins the cluster at ``RAY_ADDRESS`` (or
starts a local Ray). A cluster that does not answer (first a TCP probe of its address: Ray's own
connect would retry for minutes) or refuses it (a wrong ``RAY_AUTH_TOKEN``) is logged as an error
and tried again after ``RAY_RETRY_FIRST_S``, doubling up to ``RAY_RETRY_MAX_S``; no run is claimed,
so none fails for it. Between runs the dispatcher stays joined; when the GCS stops answering for
``RAY_LOST_S`` then, it says so and exits 1 as the watchdog does: a Ray driver cannot join a
restarted cluster in-process, and under compose its container's own Ray node is gone too, so the
supervisor's restart (``restart: unless-stopped``) is what joins the new cluster.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable

from sqlalchemy.orm import sessionmaker

from workers.records import FINISHED, Run
from workers.storage import ensure_exists

from . import store
from .config import Settings, get_settings
from .db import make_engine, migrate, session_factory
from .sink import SqlSink

log = logging.getLogger("bitbench.dispatcher")
RAY_PROBE_S = 1.0  # how often the watchdog probes Ray's GCS during a run
RAY_PROBE_STOPPING_S = 0.2  # … once a stop signal came
STOP_DEADLINE_S = 8.0  # after a stop signal, how long the sweep may take to stop before the run is handed back
RAY_LOST_S = 10.0  # without a stop signal, how long the GCS may stay unreachable before the run is handed back
EXIT_GRACE_S = 10.0  # the most the process spends in exit handlers (Ray's shutdown) after the loop ends
RAY_RETRY_FIRST_S = 1.0  # a Ray cluster that cannot be joined is tried again after this, …
RAY_RETRY_MAX_S = 60.0  # … doubling up to this
_HOST_PORT = re.compile(r"^(?:ray://)?(\[[^\]]+\]|[^:/\[\]]+):(\d+)$")


class RayUnavailable(Exception):
    """Ray cannot be joined now; the message says why."""


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _load_run_sweep() -> Callable:
    from workers.sweep import run_sweep

    return run_sweep


def gcs_address() -> str | None:
    """``host:port`` of the Ray GCS this process is connected to; None when Ray is not initialised."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address


def reachable(address: str, timeout: float = 1.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def probe_target(address: str | None) -> str | None:
    """The ``host:port`` of a Ray address (``host:port`` or ``ray://host:port``) to probe before joining;
    None for a local Ray or ``auto``."""
    match = _HOST_PORT.match((address or "").strip())
    return f"{match[1]}:{match[2]}" if match else None


def root_cause(exc: BaseException, limit: int = 300) -> str:
    """The last line of the innermost cause's text: Ray wraps what went wrong (a refused token) in
    ConnectionErrors whose own message says only "Failed to connect"."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class HandBack:
    """The helper that hands run ``run_id`` back if this process ends holding it (module doc).

    It starts with SIGTERM and SIGINT blocked (the mask is inherited; it then ignores them), reads the
    database URL, the run and the worker id from its stdin, and waits for EOF. :meth:`close` (the run is
    concluded) gives it EOF and waits for it: it then finds the run no longer held and only exits."""

    def __init__(self, url: str, run_id: int, worker_id: str):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.dispatcher", "--hand-back"],
                                         stdin=subprocess.PIPE)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        assert self.proc.stdin is not None  # stdin=PIPE
        self.stdin = self.proc.stdin
        job = {"url": url, "run_id": run_id, "worker_id": worker_id}
        self.stdin.write(json.dumps(job).encode() + b"\n")
        self.stdin.flush()

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.stdin.close()
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            log.warning("the hand-back helper (pid %s) did not end; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()


def hand_back_when_orphaned() -> int:
    """``--hand-back``: the :class:`HandBack` helper's side."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    job = json.loads(sys.stdin.readline())
    sys.stdin.read()  # until the dispatcher closes the pipe, or ends
    engine = make_engine(job["url"])
    try:
        with session_factory(engine)() as s:
            if store.release_run(s, job["run_id"], job["worker_id"]):
                log.warning("run %s: dispatcher %s ended holding it; requeued", job["run_id"], job["worker_id"])
    finally:
        engine.dispose()
    return 0


def hard_exit(code: int) -> None:
    """End the process now, skipping exit handlers (Ray's would wait 60 s on a dead GCS)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Dispatcher:
    """Claims and runs queued runs; ``shutdown`` (an Event) stops it between and inside runs.

    ``run_sweep`` defaults to ``workers.sweep.run_sweep`` (tests pass a fake), ``ray_alive``
    (True, False, or None when there is no Ray to ask) to a probe of this process's Ray GCS, and
    ``exit_process`` (what the Ray watchdog ends the process with) to :func:`hard_exit`."""

    def __init__(self, sessions: sessionmaker, settings: Settings, *, worker_id: str | None = None,
                 run_sweep: Callable | None = None, ray_alive: Callable[[], bool | None] | None = None,
                 exit_process: Callable[[int], None] = hard_exit):
        self.sessions = sessions
        self.settings = settings
        self.worker_id = worker_id or default_worker_id()
        self._run_sweep = run_sweep
        self.ray_alive = ray_alive or self._gcs_reachable
        self._exit_process = exit_process
        self.shutdown = threading.Event()
        self._signals_installed = False
        self._gcs: str | None = None
        self._ray_retry_s = RAY_RETRY_FIRST_S  # the wait before the next try to join Ray (doubles per failure)
        self._idle_lost_since: float | None = None  # between runs: since when the GCS has not answered

    # -- loop ---------------------------------------------------------------------------------
    def serve(self, *, once: bool = False, poll_s: float = 2.0) -> None:
        """Run queued runs until ``shutdown`` (or, with ``once``, after one claim attempt)."""
        log.info("dispatcher %s polling every %.1f s", self.worker_id, poll_s)
        while not self.shutdown.is_set():
            try:
                handled = self.run_once()
            except RayUnavailable as e:
                log.error("%s; retrying in %.0f s", e, self._ray_retry_s)
                if once:
                    return
                self.shutdown.wait(self._ray_retry_s)
                self._ray_retry_s = min(2 * self._ray_retry_s, RAY_RETRY_MAX_S)
                continue
            if once:
                return
            if handled is None:
                self._watch_idle_ray()
                self.shutdown.wait(poll_s)

    def run_once(self) -> int | None:
        """Requeue stale runs, join Ray if a run waits, claim one and run it to its end; returns its
        id (None: queue empty). Raises :class:`RayUnavailable` (and claims nothing) when Ray cannot be joined."""
        with self.sessions() as s:
            for rid in store.requeue_stale(s, self.settings.stale_s):
                log.warning("run %s: holder's heartbeat is stale, requeued", rid)
            if self._run_sweep is None and not store.list_runs(s, status="queued", limit=1)[1]:
                return None
        if self._run_sweep is None:
            self._join_ray()
        with self.sessions() as s:
            run = store.claim_run(s, self.worker_id)
        if run is None:
            return None
        self.execute(run)
        return run["id"]

    # -- one run ------------------------------------------------------------------------------
    def execute(self, run: Run) -> None:
        """Train a claimed run with heartbeats and the stop flag, then record how it ended."""
        run_id = run["id"]
        helper = self._hand_back_helper(run_id)
        try:
            self._execute(run)
        finally:
            if helper is not None:
                helper.close()

    def _hand_back_helper(self, run_id: int) -> HandBack | None:
        """A :class:`HandBack` for runs trained on Ray in this process (None with a given ``run_sweep``)."""
        if self._run_sweep is not None:
            return None
        try:
            return HandBack(self.sessions.kw["bind"].url.render_as_string(hide_password=False), run_id,
                            self.worker_id)
        except OSError:
            log.exception("run %s: no hand-back helper; if this process dies, staleness requeues the run", run_id)
            return None

    def _execute(self, run: Run) -> None:
        run_id = run["id"]
        stop, lost, cancelled, over = (threading.Event() for _ in range(4))
        beat = threading.Thread(target=self._heartbeat, args=(run_id, stop, lost, cancelled, over),
                                name=f"heartbeat-run-{run_id}", daemon=True)
        beat.start()
        threading.Thread(target=self._watch_ray, args=(run_id, over), name=f"watch-ray-run-{run_id}",
                         daemon=True).start()
        results: dict[str, str] = {}
        error, interrupted = None, None
        try:
            from workers.spec import parse_spec

            spec = parse_spec(run["spec"], max_trials_limit=max(run["trial_count"], 1))
            with self.sessions() as s:
                done = [t["key"] for t in store.list_trials(s, run_id) if t["status"] == "done"]
            log.info("run %s (%s): %d trials, %d already done", run_id, run["name"], run["trial_count"], len(done))
            assert self.settings.tune_dir is not None  # Settings fills it in
            ensure_exists(self.settings.tune_dir)
            if self._run_sweep is None:
                self._join_ray()
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

    def _join_ray(self) -> None:
        """Join the cluster at ``RAY_ADDRESS`` (or start a local Ray) unless joined, then put our signal
        handlers back (``ray.init`` replaces SIGTERM's with one that raises SystemExit wherever the main
        thread is). Raises :class:`RayUnavailable` when the address does not answer or Ray refuses."""
        if sys.modules.get("ray") is not None and sys.modules["ray"].is_initialized():
            return
        address = self.settings.ray_address
        where = f"the Ray cluster at {address} (RAY_ADDRESS)" if address else "a local Ray"
        target = probe_target(address)
        if target is not None and not reachable(target, timeout=2.0):
            raise RayUnavailable(f"{where} does not answer: nothing accepts connections at {target}")
        from workers.sweep import ensure_ray

        try:
            ensure_ray(address)
        except Exception as e:
            why = root_cause(e)
            hint = (" (every Ray node and the dispatcher need the cluster's RAY_AUTH_TOKEN and RAY_AUTH_MODE=token)"
                    if "AuthenticationError" in why or "InvalidAuthToken" in why else "")
            raise RayUnavailable(f"{where} cannot be joined: {why}{hint}") from e
        finally:
            if self._signals_installed:
                self.install_signal_handlers()
        if address:
            log.info("joined %s", where)
        self._ray_retry_s = RAY_RETRY_FIRST_S

    def _watch_idle_ray(self) -> None:
        """Between runs: end the process once the joined Ray's GCS has not answered for ``RAY_LOST_S`` (module doc)."""
        if self.ray_alive() is not False:
            self._idle_lost_since = None
            return
        now = time.monotonic()
        self._idle_lost_since = self._idle_lost_since or now
        if now - self._idle_lost_since >= RAY_LOST_S:
            log.error("Ray's GCS (%s) does not answer for %.0f s (no run held); exiting so that a restart joins "
                      "the cluster again", self._gcs or "?", RAY_LOST_S)
            self._exit_process(1)

    def _gcs_reachable(self) -> bool | None:
        try:
            self._gcs = self._gcs or gcs_address()
        except Exception:  # Ray is starting or stopping in the main thread: ask again later
            return None
        return None if self._gcs is None else reachable(self._gcs)

    def _watch_ray(self, run_id: int, over: threading.Event) -> None:
        """Until ``over``: hand the run back and end the process once Ray's GCS is gone (module doc)."""
        lost_since = stop_since = None
        while not over.wait(RAY_PROBE_STOPPING_S if self.shutdown.is_set() else RAY_PROBE_S):
            now = time.monotonic()
            if self.shutdown.is_set():
                stop_since = stop_since or now
            stuck = stop_since is not None and now - stop_since >= STOP_DEADLINE_S
            if self.ray_alive() is not False and not stuck:
                lost_since = None
                continue
            lost_since = lost_since or now
            due = stuck or self.shutdown.is_set() or now - lost_since >= RAY_LOST_S
            if not due or over.is_set():
                continue
            why = (f"the sweep has not stopped {STOP_DEADLINE_S:.0f} s after a stop signal (Ray lost its "
                   "workers?)" if stuck and self.ray_alive() is not False
                   else f"Ray's GCS ({self._gcs or '?'}) does not answer"
                   + (" after a stop signal" if self.shutdown.is_set() else f" for {RAY_LOST_S:.0f} s"))
            log.error("run %s: %s; handing the run back and exiting", run_id, why)
            try:
                with self.sessions() as s:
                    if store.release_run(s, run_id, self.worker_id):
                        log.info("run %s: requeued", run_id)
            except Exception:  # the database is unreachable too: staleness decides
                log.exception("run %s: could not requeue", run_id)
            self._exit_process(0 if self.shutdown.is_set() else 1)
            return

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
                shown = "; ".join(f"{t['key']}: {(t['error'] or 'failed').strip().splitlines()[-1]}"
                                  for t in failed[:5])
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
    parser.add_argument("--hand-back", action="store_true", help=argparse.SUPPRESS)  # HandBack's helper
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.hand_back:
        return hand_back_when_orphaned()
    # our stop flag, not Tune's own SIGINT handler, ends a sweep
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    settings = get_settings()
    engine = make_engine(settings.database_url)
    migrate(engine)
    dispatcher = Dispatcher(session_factory(engine), settings, worker_id=args.worker_id)
    dispatcher.install_signal_handlers()
    code = 0
    try:
        dispatcher.serve(once=args.once, poll_s=args.poll_seconds)
    except KeyboardInterrupt:
        log.info("stopped")
        code = 130
    finally:
        engine.dispose()
    if dispatcher.ray_alive() is False:  # Ray died under us: its exit handler would wait 60 s on the GCS
        hard_exit(code)
    # the exit handler stops a local Ray; when the GCS is dying too (a signal to the whole process group)
    # it would wait 60 s and abort: end the process after EXIT_GRACE_S in any case
    deadline = threading.Timer(EXIT_GRACE_S, hard_exit, (code,))
    deadline.daemon = True
    deadline.start()
    return code


if __name__ == "__main__":
    raise SystemExit(main())

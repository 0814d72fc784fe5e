"""``make run``: the API and the dispatcher (with a local Ray) on SQLite, the demo queued.

    python -m service.run [--host 127.0.0.1] [--port 8000] [--no-demo]

Creates the data directory (``BITBENCH_DATA_DIR`` or ``~/.cache/bitbench``), points
``DATABASE_URL`` at a SQLite file there unless it is set, migrates, queues the demo sweep
(:mod:`service.demo`) unless a run with its spec hash exists, then starts uvicorn
(``service.app:app`` on ``BITBENCH_PORT`` / 8000 or the next free port) and
``python -m service.dispatcher`` as child processes, each in its own process group, and prints
the URLs. One Ctrl-C (or SIGTERM) stops both: SIGTERM to each, a grace period, then SIGKILL to
their process groups; a second Ctrl-C kills at once. If either child dies, the other is stopped.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
from sqlalchemy.engine import make_url

from service import store
from service.config import get_settings
from service.db import make_engine, migrate, session_factory
from service.demo import demo_spec
from workers.records import Run

GRACE_S = 30.0  # the dispatcher hands its run back to the queue and shuts Ray down
READY_S = 60.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen

    @classmethod
    def start(cls, name: str, *args: str) -> Child:
        return cls(name, subprocess.Popen([sys.executable, *args], start_new_session=True))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int, *, group: bool = False) -> None:
        try:
            os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        except ProcessLookupError:
            pass


def free_port(host: str, start: int, tries: int = 100) -> int:
    """``start`` if it can be bound on ``host``, else the next port that can."""
    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}–{start + tries - 1} on {host}")


def queue_demo(sessions) -> tuple[Run, bool]:
    """Queue the demo unless a run with the same spec hash exists; returns ``(run, created)``."""
    spec = demo_spec()
    with sessions() as s:
        found = store.run_by_spec_hash(s, spec.spec_hash())
        return (found, False) if found is not None else store.create_run(s, spec)


def wait_ready(url: str, children: list[Child], cancel: threading.Event, timeout: float = READY_S) -> None:
    """Until ``url`` answers 200; raises if a child dies, ``cancel`` is set or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cancel.is_set():
        dead = [c.name for c in children if not c.alive()]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited during start-up")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("interrupted" if cancel.is_set() else f"{url} did not answer within {timeout:.0f} s")


def stop(children: list[Child], grace: float, stop_now: threading.Event) -> None:
    """SIGTERM each child, wait up to ``grace`` (or until ``stop_now``), then SIGKILL the groups."""
    for c in children:
        if c.alive():
            c.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(c.alive() for c in children) and time.monotonic() < deadline and not stop_now.is_set():
        time.sleep(0.2)
    for c in children:  # also whatever a child left in its group
        c.signal(signal.SIGKILL, group=True)
        c.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("BITBENCH_PORT", 8000)))
    parser.add_argument("--no-demo", action="store_true", help="do not queue the demo sweep")
    parser.add_argument("--grace", type=float, default=GRACE_S, help="seconds children get to stop")
    args = parser.parse_args(argv)

    get_settings.cache_clear()
    home = get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{home / 'bitbench.sqlite'}")
    get_settings.cache_clear()
    settings = get_settings()

    engine = make_engine(settings.database_url)
    migrate(engine)
    if not args.no_demo:
        run, created = queue_demo(session_factory(engine))
        print(f"demo: run {run['id']} ({run['trial_count']} trials) {'queued' if created else 'already there'}",
              flush=True)
    engine.dispose()

    port = free_port(args.host, args.port)
    base = f"http://{args.host}:{port}"
    stop_requested, stop_now = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        (stop_now if stop_requested.is_set() else stop_requested).set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children = [
        Child.start("api", "-m", "uvicorn", "service.app:app", "--host", args.host, "--port", str(port)),
        Child.start("dispatcher", "-m", "service.dispatcher"),
    ]
    code = 0
    try:
        wait_ready(f"{base}/healthz", children, stop_requested)
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
        print(f"\nbitbench is up (database {shown})\n  API:       {base}/docs\n"
              f"  dashboard: {base}/dashboard\nCtrl-C stops everything.\n", flush=True)
        while not stop_requested.is_set():
            dead = [c for c in children if not c.alive()]
            if dead:
                print(f"{dead[0].name} exited with {dead[0].proc.returncode}; stopping", file=sys.stderr, flush=True)
                code = 1
                break
            stop_requested.wait(0.5)
    except RuntimeError as e:
        print(f"start-up failed: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        print("stopping …", flush=True)
        stop(children, args.grace, stop_now)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

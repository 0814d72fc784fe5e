"""A run's report: the folder (``build_report``), its zip, and serving it (GET /runs/{id}/report).

The folder holds RESULTS.md, the figures as HTML and PNG, a LaTeX table, the spec and the
machine (:func:`dashboard.report.write_report` over the run's plain records).

Serving goes through the app's :class:`ReportService` (:func:`reports`):

- A finished run's (done, failed, cancelled) archive is rendered once and kept in the database
  (``report_archives``) under its *fingerprint*: ``REPORT_FORMAT`` plus the run's
  ``store.results_fingerprint``, so edited rows or a new report format render it again. The
  database rather than a cache directory: every API replica sees it (compose can scale ``api``,
  which has no volume), it survives restarts, and it goes when the run goes. An archive is a few
  MB, mostly plotly.js inlined into each HTML figure. An archive whose PNGs failed is served but
  not kept.
- A queued or running run's report is rendered on every request (its results move).
- No database session is held while rendering: the records are read in a short session, closed
  before the render starts in a process pool (spawned workers at ``RENDER_NICE``, so the
  API's requests keep their CPU and share no GIL with a render; kaleido's Chromium runs under the
  worker, niced too).
- At most ``max_renders`` (``BITBENCH_REPORT_RENDERS``) renders run at once per API process; a
  request that needs another gets :class:`RendersBusy` (the route answers 503 with
  ``Retry-After``, the mean render time so far). A request for a report whose render is in
  flight waits for that render instead of starting its own.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
import weakref
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from importlib import metadata
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from dashboard.capacity import model_label
from dashboard.report import write_report
from workers.records import FINISHED

from . import store

REPORT_FORMAT = "3"  # bump when write_report's output changes: stored archives are rendered again
RENDER_NICE = 10  # render workers' niceness above the API's
FIRST_RETRY_AFTER_S = 10  # Retry-After before any render has finished (a PNG render takes ≈ 5–10 s)


def environment(trials: list[dict]) -> dict:
    """Versions and machine the numbers came from (this process's, plus the trials' devices)."""

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "python": sys.version.split()[0],
        "bitbench": version("bitbench"), "torch": version("torch"), "torchvision": version("torchvision"),
        "ray": version("ray"), "numpy": version("numpy"),
        "platform": platform.platform(), "machine": f"{cpu or platform.machine()}, {os.cpu_count()} CPUs",
        "devices": sorted({t["device"] for t in trials if t.get("device")}),
    }


# -- the folder -------------------------------------------------------------------------------
def load_records(s: Session, run_id: int) -> dict | None:
    """``{run, leaderboard, trials, epoch_rows}``: the plain records a report is drawn from; None
    for an unknown run. Trials and epoch rows carry the run's ``model_label`` (model and options)."""
    run = store.get_run(s, run_id)
    if run is None:
        return None
    label = model_label(run["model"], run["spec"].get("model_options"))
    return {"run": run, "leaderboard": store.leaderboard(s, run_id=run_id),
            "selected_leaderboard": store.leaderboard(s, run_id=run_id, metric="selected"),
            "trials": [{**t, "model_label": label} for t in store.run_results(s, run_id)],
            "epoch_rows": [{**r, "model_label": label} for r in store.export_rows(s, run_id)]}


def load_study_records(s: Session, run_ids: list[int]) -> dict | int:
    """The records of several runs reported together (e.g. one run per model size of a capacity study, or a
    study's runs under one protocol): one leaderboard over their trials (per protocol, so runs of one protocol
    are ranked together and a seed two of them trained counts once), their trials and epoch rows concatenated,
    under a ``run`` that lists them (``runs``) and whose ``spec`` is the list of their specs. One run id gives
    :func:`load_records`'s. Returns the first unknown run id instead where one is unknown."""
    loaded = []
    for run_id in dict.fromkeys(run_ids):
        records = load_records(s, run_id)
        if records is None:
            return run_id
        loaded.append(records)
    if len(loaded) == 1:
        return loaded[0]
    runs = [r["run"] for r in loaded]
    names = [r["name"] for r in runs]
    common = os.path.commonprefix(names)
    if common not in names:  # cut a shared prefix at its last separator: "study: Model A", "study: Model B" → "study"
        common = common[:max(common.rfind(c) for c in ":;,·(")].rstrip() if any(c in common for c in ":;,·(") else ""
    run = {**runs[0], "id": ", ".join(str(r["id"]) for r in runs), "name": common or "; ".join(names),
           "model": ", ".join(dict.fromkeys(r["model"] for r in runs)),
           "dataset": ", ".join(dict.fromkeys(r["dataset"] for r in runs)),
           "status": ", ".join(dict.fromkeys(r["status"] for r in runs)),
           "trial_count": sum(r["trial_count"] for r in runs), "spec": [r["spec"] for r in runs], "runs": runs}
    ids = [r["id"] for r in runs]
    return {"run": run, "leaderboard": store.leaderboard(s, run_id=ids),
            "selected_leaderboard": store.leaderboard(s, run_id=ids, metric="selected"),
            **{key: [row for r in loaded for row in r[key]] for key in ("trials", "epoch_rows")}}


def write_records(records: dict, out_dir: str | Path, *, png: bool = True) -> dict[str, Path]:
    """Write the report folder of ``records`` (:func:`load_records`) into ``out_dir``."""
    return write_report(out_dir, **records, environment=environment(records["trials"]), png=png)


def build_report(s: Session, run_id: int | list[int], out_dir: str | Path, *,
                 png: bool = True) -> dict[str, Path] | None:
    """Write run ``run_id``'s report into ``out_dir`` (a list of run ids: one report over them all,
    :func:`load_study_records`); None for an unknown run."""
    records = load_study_records(s, run_id if isinstance(run_id, list) else [run_id])
    return None if isinstance(records, int) else write_records(records, out_dir, png=png)


def zip_folder(folder: str | Path, prefix: str) -> bytes:
    """The folder's files as a zip archive under ``prefix/``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(Path(folder).iterdir()):
            z.write(path, f"{prefix}/{path.name}")
    return buf.getvalue()


def archive_name(run_id: int | str) -> str:
    """``bitbench-run-3``; for a report over several runs (id ``"3, 4, 5"``) ``bitbench-runs-3-4-5``."""
    ids = str(run_id).split(", ")
    return f"bitbench-run-{ids[0]}" if len(ids) == 1 else "bitbench-runs-" + "-".join(ids)


def render_archive(records: dict, png: bool) -> tuple[bytes, bool]:
    """``(zip, complete)``: the report folder zipped under ``bitbench-run-<id>/``; ``complete`` is
    False when PNGs were asked for and not written (kaleido or Chromium failed)."""
    with tempfile.TemporaryDirectory(prefix="bitbench-report-") as tmp:
        files = write_records(records, tmp, png=png)
        body = zip_folder(tmp, archive_name(records["run"]["id"]))
    return body, not png or any(name.endswith(".png") for name in files)


# -- serving ----------------------------------------------------------------------------------
class RendersBusy(Exception):
    """Every render slot is taken; try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int, max_renders: int):
        super().__init__(f"{max_renders} report(s) are being rendered, the most at once "
                         f"(BITBENCH_REPORT_RENDERS); retry in {retry_after} s")
        self.retry_after = retry_after


def _init_render_worker(parent: int) -> None:
    """In a render worker: lower its priority, and exit once the process that started it is gone
    (uvicorn ends by re-raising SIGTERM, so the pool's own exit handler never runs)."""
    os.nice(RENDER_NICE)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


class ReportService:
    """Report archives for one app: stored ones served, others rendered off the database session.

    ``render(records, png) -> (zip, complete)`` runs on ``executor`` (default: a spawned process
    pool of ``max_renders`` workers at ``RENDER_NICE``, started on first use). ``renders`` counts
    the renders started.
    """

    def __init__(self, sessions: sessionmaker, max_renders: int, *,
                 render: Callable[[dict, bool], tuple[bytes, bool]] = render_archive, executor: Executor | None = None):
        self.sessions = sessions
        self.max_renders = max_renders
        self.slots = threading.BoundedSemaphore(max_renders)
        self.renders = 0
        self._render_fn = render
        self._executor = executor
        self._inflight: dict[tuple, asyncio.Task] = {}
        self._seconds: deque[float] = deque(maxlen=8)

    async def archive(self, run_id: int, png: bool) -> bytes | None:
        """The run's report as a zip; None for an unknown run. Raises :class:`RendersBusy`."""
        found = await run_in_threadpool(self._stored, run_id, png)
        if found is None:
            return None
        fingerprint, body = found
        if body is not None:
            return body
        key = (run_id, png, fingerprint)
        task = self._inflight.get(key)
        if task is None:
            if not self.slots.acquire(blocking=False):
                raise RendersBusy(self.retry_after(), self.max_renders)
            task = self._inflight[key] = asyncio.create_task(self._render(key, run_id, png))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen even if no request waits
        return await asyncio.shield(task)  # a client that goes away does not stop the render

    async def combined(self, run_ids: list[int], png: bool) -> bytes | int:
        """One report over several runs (:func:`load_study_records`) as a zip, or the first unknown run's id.
        Rendered on every request, never stored (its runs' archives are; this one is asked for once, by hand).
        Takes a render slot like any render; raises :class:`RendersBusy`."""
        records = await run_in_threadpool(self._load_several, run_ids)
        if isinstance(records, int):
            return records
        if not self.slots.acquire(blocking=False):
            raise RendersBusy(self.retry_after(), self.max_renders)
        try:
            self.renders += 1
            start = time.monotonic()
            body, _ = await asyncio.wrap_future(self._pool().submit(self._render_fn, records, png))
            self._seconds.append(time.monotonic() - start)
            return body
        except BrokenProcessPool:
            self._executor = None
            raise
        finally:
            self.slots.release()

    def retry_after(self) -> int:
        """Seconds a client should wait for a free slot: the mean of the last renders."""
        return math.ceil(sum(self._seconds) / len(self._seconds)) if self._seconds else FIRST_RETRY_AFTER_S

    # -- steps (database steps run in the thread pool, each in its own short session) ---------
    def _stored(self, run_id: int, png: bool) -> tuple[str, bytes | None] | None:
        with self.sessions() as s:
            state = store.results_fingerprint(s, run_id)
            if state is None:
                return None
            fingerprint = _fingerprint(state[1])
            return fingerprint, store.report_archive(s, run_id, png, fingerprint) if state[0] in FINISHED else None

    def _load(self, run_id: int) -> tuple[dict, str, str] | None:
        with self.sessions() as s:
            state = store.results_fingerprint(s, run_id)
            records = load_records(s, run_id) if state is not None else None
        if records is None or state is None:
            return None
        return records, state[0], _fingerprint(state[1])

    def _load_several(self, run_ids: list[int]) -> dict | int:
        with self.sessions() as s:
            return load_study_records(s, run_ids)

    def _save(self, run_id: int, png: bool, fingerprint: str, body: bytes) -> None:
        with self.sessions() as s:
            store.save_report_archive(s, run_id, png, fingerprint, body)

    async def _render(self, key: tuple, run_id: int, png: bool) -> bytes | None:
        try:
            loaded = await run_in_threadpool(self._load, run_id)
            if loaded is None:
                return None
            records, status, fingerprint = loaded
            self.renders += 1
            start = time.monotonic()
            body, complete = await asyncio.wrap_future(self._pool().submit(self._render_fn, records, png))
            self._seconds.append(time.monotonic() - start)
            if status in FINISHED and complete:
                await run_in_threadpool(self._save, run_id, png, fingerprint, body)
            return body
        except BrokenProcessPool:
            self._executor = None  # a worker died (killed, out of memory): the next render gets a new pool
            raise
        finally:
            del self._inflight[key]
            self.slots.release()

    def _pool(self) -> Executor:
        if self._executor is None:
            pool = ProcessPoolExecutor(self.max_renders, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_render_worker, initargs=(os.getpid(),))
            weakref.finalize(self, pool.shutdown, wait=False, cancel_futures=True)
            self._executor = pool
        return self._executor


def _fingerprint(results: str) -> str:
    """The archive's key: the run's results fingerprint under this ``REPORT_FORMAT``."""
    return hashlib.sha256(f"report {REPORT_FORMAT} of {results}".encode()).hexdigest()


def reports(app) -> ReportService:
    """The app's :class:`ReportService`, made on first use from its settings and sessions."""
    service = getattr(app.state, "reports", None)
    if service is None:
        service = app.state.reports = ReportService(app.state.session_factory, app.state.settings.report_renders)
    return service

"""Run a whole experiment spec on Ray Tune: one trial per grid cell, results to a sink.

    python -m workers.sweep SPEC.json --out results.jsonl [--storage DIR] [--name NAME]

:func:`run_sweep` is the contract (docs/CONTRACTS.md). A FIFO grid (no early stopping) of
function trainables, each resuming from its latest Tune checkpoint and reporting short epochs
in batches (:class:`EpochBatcher`); retries through
``FailureConfig``; results and cancellation handled by the driver-side callback of
``workers.tune_callback``. An experiment directory that Tune can restore is
restored (``Tuner.restore``): finished trials are not trained again, unfinished and errored
ones resume from their checkpoints (or, where the snapshot names one deleted before the driver
died, the one that replaced it), and the callback's saved state keeps every epoch from
reaching the sink twice.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import pyarrow.fs
import ray
import torch
from ray import tune

from .packed import packed_summary
from .sinks import ResultSink
from .spec import ExperimentSpec, TrialSpec, parse_spec
from .storage import join, resolve_storage
from .train import run_trial
from .tune_callback import FINAL_KEY, PROVENANCE_KEY, SinkCallback, SweepBinding, SweepStopped, bound, epochs_report

STATE_FILE = "trial_state.pt"
CHECKPOINTS_KEPT = 1  # also forces an experiment snapshot after every checkpoint (see run_sweep)
REPORT_EVERY_S = 2.0  # short epochs wait for a report at most this long (a report with its checkpoint: 5–14 ms)
REPORT_EVERY_ENV = "BITBENCH_REPORT_EVERY_S"  # overrides REPORT_EVERY_S in the driver; 0 = report every epoch
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")  # Tune's checkpoint_<index, 6 digits>
log = logging.getLogger(__name__)


# -- paths and names -------------------------------------------------------------------------
def default_experiment_name(spec: ExperimentSpec) -> str:
    """``<spec name, filesystem-safe>-<12 hex of the spec hash>``: the same spec finds its experiment again."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name).strip("-.")[:60] or "sweep"
    return f"{safe}-{spec.spec_hash()[:12]}"


def ensure_ray(address: str | None = None) -> None:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local Ray, unless Ray is up already."""
    if ray.is_initialized():
        return
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)


# -- the trainable (runs in a Ray worker) ----------------------------------------------------
class TrialHooks(Protocol):
    """What a caller of :func:`run_sweep` may run inside every trial attempt, in its Ray worker (tests trace
    attempts and inject faults with it; it is pickled to the workers). Exceptions fail the attempt."""

    def started(self, trial_key: str, epoch: int) -> None:
        """An attempt starts from the checkpoint of ``epoch`` (0: from scratch)."""

    def trained(self, trial_key: str, epoch: int) -> None:
        """``epoch`` is trained, before it is reported and checkpointed (perhaps later: :class:`EpochBatcher`)."""


def resolve_report_every_s(value: float | None = None) -> float:
    """The least seconds between a trial's reports of short epochs: ``value``, else $BITBENCH_REPORT_EVERY_S,
    else :data:`REPORT_EVERY_S`; 0 reports every epoch. Not a number >= 0: ValueError naming it."""
    if value is None:
        text = os.environ.get(REPORT_EVERY_ENV, "").strip()
        try:
            value = float(text) if text else REPORT_EVERY_S
        except ValueError:
            raise ValueError(f"${REPORT_EVERY_ENV} must be a number of seconds, not {text!r}") from None
    if not value >= 0:  # also NaN
        raise ValueError(f"report_every_s must be a number of seconds >= 0, not {value!r}")
    return float(value)


class EpochBatcher:
    """When a trial attempt reports: each epoch's metrics wait until ``every_s`` seconds have passed since the
    attempt's last report (or its start), or until the trial's last epoch; then the waiting epochs go out in
    one report, with the checkpoint of the newest. An epoch that alone takes ``every_s`` or longer is
    reported at once, so epochs that long (and every epoch, with ``every_s`` = 0) are reported one by one.

    Waiting epochs have no checkpoint yet: an attempt that dies retrains them from its last reported one,
    so an epoch reaches the sink only together with a checkpoint at or after it.
    """

    def __init__(self, every_s: float, last_epoch: int, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.last_epoch, self.clock = every_s, last_epoch, clock
        self.since = clock()
        self.waiting: list[dict] = []

    def add(self, metrics: dict) -> list[dict]:
        """Add an epoch's metrics; return the epochs to report now, oldest first (empty: wait)."""
        self.waiting.append(metrics)
        now = self.clock()
        if metrics["epoch"] < self.last_epoch and now - self.since < self.every_s:
            return []
        batch, self.waiting, self.since = self.waiting, [], now
        return batch


def _load_state(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d, STATE_FILE), map_location="cpu", weights_only=False)  # our own files


def bitbench_trial(config: dict, *, spec_json: str, data_dir: str | None, hooks: TrialHooks | None = None,
                   report_every_s: float = REPORT_EVERY_S) -> None:
    """Tune function trainable: ``config`` = {"trial": TrialSpec dict, "spec_hash": str}.

    Resumes from ``tune.get_checkpoint()``, reports the epochs it trains with a checkpoint holding the
    full resume state after the newest, then reports ``{"final": {...}}`` once. Epochs shorter than
    ``report_every_s`` are reported several at a time (:class:`EpochBatcher`; the report's layout:
    :func:`workers.tune_callback.epochs_report`); longer ones, and every epoch with 0, one report each.
    The attempt's first report also carries its provenance (:mod:`workers.provenance`) as JSON text under
    ``"provenance"`` (one column for Tune's CSV and TensorBoard loggers). ``hooks`` (:class:`TrialHooks`)
    see the attempt: ``trained`` once per epoch trained, reported or not.
    """
    spec = parse_spec(spec_json)
    if config["spec_hash"] != spec.spec_hash():
        raise ValueError("this experiment directory was started with a different spec; use another experiment name")
    trial = TrialSpec.model_validate(config["trial"])
    state = _load_state(tune.get_checkpoint())
    if hooks is not None:
        hooks.started(trial.key, state["epoch"] if state else 0)

    unsent: dict[str, str] = {}  # the attempt's provenance, sent with its first report
    batcher = EpochBatcher(report_every_s, spec.epochs)

    def on_start(record: dict) -> None:
        unsent[PROVENANCE_KEY] = json.dumps(record)

    def on_epoch(metrics: dict, epoch_state: dict) -> None:
        if hooks is not None:
            hooks.trained(trial.key, metrics["epoch"])
        batch = batcher.add(metrics)
        if not batch:
            return
        with tempfile.TemporaryDirectory(prefix="bitbench-ckpt-") as d:
            torch.save(epoch_state, Path(d, STATE_FILE))
            tune.report({**epochs_report(batch), **unsent}, checkpoint=tune.Checkpoint.from_directory(d))
        unsent.clear()

    final = run_trial(spec, trial, on_epoch=on_epoch, on_start=on_start, resume_state=state, data_dir=data_dir,
                      threads=max(1, int(spec.resources.cpu)), packed_check=packed_summary)
    tune.report({FINAL_KEY: final, **unsent})


def replace_lost_checkpoint(checkpoint: tune.Checkpoint) -> bool:
    """If ``checkpoint`` (the one Tune's experiment snapshot names) is gone, put the trial's oldest surviving
    newer checkpoint in its place and return True; False when it is there (or nothing newer survives).

    Why it can be gone (issue 15): registering a trial's checkpoint deletes the previous one at once
    (``num_to_keep``), and the experiment snapshot naming the new one is written at the end of Tune's step and
    uploaded in the background; a driver killed in between leaves a snapshot naming a deleted checkpoint.
    Why the oldest newer one is right: Tune registers a checkpoint only after its epoch's result went through
    the driver's callback to the sink, and deletes only checkpoints older than the latest registered one, so
    the oldest surviving checkpoint newer than the named one is an epoch the sink has; newer ones may hold
    epochs the driver never saw (the worker persists a checkpoint before the driver reads its result), and
    resuming from them would lose those epochs. The copy (written under a temporary name, then renamed) keeps
    Tune's own bookkeeping valid: a later restore from the snapshot finds the same state, and Tune's deletion of
    the named checkpoint finds a directory to delete.
    """
    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    target = f"{path}/{STATE_FILE}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.NotFound:
        return False
    trial_dir, name = path.rsplit("/", 1)
    lost = _CHECKPOINT_DIR.match(name)
    if lost is None:
        return False
    newer = sorted(
        (int(m.group(1)), info.path) for info in fs.get_file_info(pyarrow.fs.FileSelector(trial_dir))
        if info.type == pyarrow.fs.FileType.Directory and (m := _CHECKPOINT_DIR.match(info.base_name))
        and int(m.group(1)) > int(lost.group(1))
        and fs.get_file_info(f"{info.path}/{STATE_FILE}").type == pyarrow.fs.FileType.File)
    if not newer:
        return False
    source = newer[0][1]
    fs.create_dir(path, recursive=True)
    fs.copy_file(f"{source}/{STATE_FILE}", f"{target}.part")
    fs.move(f"{target}.part", target)
    log.warning("checkpoint %s was deleted before an experiment snapshot replaced it; resuming from %s", path, source)
    return True


class ResumeFromSurvivingCheckpoint:
    """Trainable mixin: before Tune restores a trial, :func:`replace_lost_checkpoint` on the checkpoint it names."""

    def restore(self, checkpoint_path):
        checkpoint = getattr(checkpoint_path, "checkpoint", None)  # Tune passes a _TrainingResult
        if checkpoint is not None:
            replace_lost_checkpoint(checkpoint)
        return super().restore(checkpoint_path)  # type: ignore[misc]


def make_trainable(spec: ExperimentSpec, data_dir: str | os.PathLike | None = None, hooks: TrialHooks | None = None,
                   report_every_s: float = REPORT_EVERY_S):
    """``bitbench_trial`` with the spec, data directory, hooks and report interval bound, the spec's resources,
    and :class:`ResumeFromSurvivingCheckpoint` mixed into the trainable class Tune makes of it."""
    data = str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None
    fn = tune.with_parameters(bitbench_trial, spec_json=spec.canonical_json(), data_dir=data, hooks=hooks,
                              report_every_s=report_every_s)
    fn.__mixins__ = (ResumeFromSurvivingCheckpoint,)  # Tune's wrap_function puts these before FunctionTrainable
    return tune.with_resources(fn, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


# -- the driver ------------------------------------------------------------------------------
def longest_first(trials: list[TrialSpec]) -> list[TrialSpec]:
    """The order Tune starts the trials in: expected-longest first (the LPT rule), so the sweep's
    tail is short trials filling the last free slots rather than one long trial alone. Every trial
    of a spec trains the same model for the same epochs, so the expected cost is the quantizers':
    more weight + activation bits cost more (multi-level quantizers do more per element), the
    float reference least; ties keep grid order (stable sort)."""
    return sorted(trials, key=lambda t: -1 if t.is_float else -(t.w_bits + t.a_bits))


def _new_tuner(spec: ExperimentSpec, trials: list[TrialSpec], trainable, storage: str, name: str) -> tune.Tuner:
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.model_dump(mode="json") for t in longest_first(trials)]),
                     "spec_hash": spec.spec_hash()},
        tune_config=tune.TuneConfig(reuse_actors=True),  # FIFO scheduler, grid search: no early stopping
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=[SinkCallback(name)],
            failure_config=tune.FailureConfig(max_failures=spec.max_retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        ),
    )


def run_sweep(
    spec: ExperimentSpec,
    sink: ResultSink,
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    storage_path: str | os.PathLike | None = None,
    experiment_name: str | None = None,
    skip_keys: Iterable[str] = (),
    ray_address: str | None = None,
    data_dir: str | os.PathLike | None = None,
    hooks: TrialHooks | None = None,
    report_every_s: float | None = None,
) -> dict[str, str]:
    """Run every trial of ``spec`` not in ``skip_keys``; return {trial_key: done | failed |
    cancelled | skipped} for the whole grid.

    Events go to ``sink`` from this process: ``on_trial_start`` and ``on_provenance`` per attempt,
    ``on_epoch`` once per (trial, epoch), ``on_trial_end`` per trial. ``stop_requested`` is polled about twice a
    second; once True every unfinished trial is stopped and ends "cancelled" (as do trials a
    Ctrl+C leaves unfinished). The experiment lives in ``storage_path/experiment_name``
    (defaults: :func:`resolve_storage`, :func:`default_experiment_name`); if Tune can restore
    it, it is restored instead of started: done trials stay done, cancelled, interrupted and
    failed ones resume from their latest checkpoints (``skip_keys`` then only matters for cells
    the experiment never had). An exception from the sink stops the sweep and is re-raised
    here; the next run restores from the last experiment snapshot, which Tune forces after
    every checkpoint (``num_to_keep=1``), so at most the epochs of a report in flight are trained again and
    the callback's saved state keeps them from reaching the sink twice (but for those of a report the sink
    failed in the middle of: the epochs before the failing one come again, and sinks ignore repeats). A snapshot
    that names a
    checkpoint Tune deleted just before the driver died resumes that trial from the checkpoint that
    replaced it (:func:`replace_lost_checkpoint`). ``hooks`` run in every trial attempt (:class:`TrialHooks`).

    Trials report epochs shorter than ``report_every_s`` seconds (default :func:`resolve_report_every_s`:
    $BITBENCH_REPORT_EVERY_S, else :data:`REPORT_EVERY_S`; 0 = every epoch) several at a time, each report with
    the checkpoint of its newest epoch (:class:`EpochBatcher`): the sink gets them in bursts, still once each
    and in order, and a trial stopped or failed between reports retrains its unreported epochs. Trials of
    longer epochs report and checkpoint every epoch.
    """
    storage = resolve_storage(storage_path)
    name = experiment_name or default_experiment_name(spec)
    exp_dir = join(storage, name)
    skip = set(skip_keys)
    grid = spec.trials()
    todo = [t for t in grid if t.key not in skip]
    restoring = tune.Tuner.can_restore(exp_dir)
    every_s = resolve_report_every_s(report_every_s)  # a bad value fails here, before Ray starts
    if not todo and not restoring:
        return {t.key: "skipped" for t in grid}

    ensure_ray(ray_address)
    # CheckpointConfig(num_to_keep=1) forces an experiment snapshot after every trial checkpoint:
    # the restore point and the callback's record of delivered epochs never lag. Tune warns about
    # frequent forced snapshots; this is on purpose.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    binding = SweepBinding(sink, stop_requested, device="cuda:0" if spec.resources.gpu > 0 else "cpu")
    trainable = make_trainable(spec, data_dir, hooks, every_s)
    with bound(name, binding):
        if restoring:
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
        else:
            tuner = _new_tuner(spec, todo, trainable, storage, name)
        try:
            tuner.fit()
        except SweepStopped:
            pass
        except tune.TuneError:
            if binding.sink_error is not None:
                raise binding.sink_error from None
            raise
        unfinished = [k for k in binding.trial_keys if k not in binding.ended]
        if binding.cancelled or unfinished:  # stopped early: cells Tune had not created yet are unfinished too
            unfinished += [t.key for t in todo if t.key not in binding.trial_keys and t.key not in binding.ended]
        for key in unfinished:
            why = None if binding.cancelled else "interrupted; run the sweep again to resume"
            binding.end(key, "cancelled", None, why)
    statuses = {t.key: "skipped" for t in grid}
    statuses.update({k: v for k, v in binding.ended.items() if k in statuses or k in binding.trial_keys})
    return statuses


# -- command line ----------------------------------------------------------------------------
class ProgressSink:
    """A rich progress display fed by sink events: trials finished / total, epochs of running trials."""

    def __init__(self, progress, total_trials: int, epochs: int):
        self.progress, self.epochs = progress, epochs
        self.overall = progress.add_task("trials", total=total_trials)
        self.running: dict[str, int] = {}

    def on_trial_start(self, trial_key: str, info: dict) -> None:
        if trial_key not in self.running:
            self.running[trial_key] = self.progress.add_task(f"  {trial_key}", total=self.epochs)

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        pass  # not shown: the --out file has it

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        self.on_trial_start(trial_key, {})
        self.progress.update(self.running[trial_key], completed=metrics["epoch"])

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        task = self.running.pop(trial_key, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.advance(self.overall)
        if status != "done":
            detail = f" — {error.strip().splitlines()[-1]}" if error and error.strip() else ""
            self.progress.console.print(f"[yellow]{trial_key}: {status}[/]{detail}")


def main(argv: list[str] | None = None) -> int:
    import typer
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .sinks import JsonlSink, TeeSink

    def cli(
        spec_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="experiment spec (JSON)"),
        out: Path = typer.Option(..., "--out", help="results, one JSON line per event (appended)"),
        storage: str = typer.Option(None, "--storage", help="Tune storage: a directory or a URI such as "
                                    "s3://bucket/prefix (default $BITBENCH_TUNE_DIR or ~/.cache/bitbench/tune)"),
        name: str = typer.Option(None, "--name", help="experiment name (default: spec name + hash; rerun to resume)"),
        data_dir: Path = typer.Option(None, "--data-dir", help="data sets (default $BITBENCH_DATA_DIR)"),
        address: str = typer.Option(None, "--address", help="Ray cluster (default $RAY_ADDRESS or a local Ray)"),
    ) -> None:
        """Run every trial of SPEC_FILE on Ray Tune and append the results to --out."""
        spec = parse_spec(spec_file.read_text())
        console = Console()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with JsonlSink(out) as jsonl, Progress(*columns, console=console) as progress:
            shown = ProgressSink(progress, spec.trial_count(), spec.epochs)
            statuses = run_sweep(spec, TeeSink(jsonl, shown), storage_path=storage, experiment_name=name,
                                 ray_address=address, data_dir=data_dir)
        console.print(f"{spec.name}: results appended to {out}")
        table = Table("status", "trials")
        for status in sorted(set(statuses.values())):
            table.add_row(status, str(sum(v == status for v in statuses.values())))
        console.print(table)
        if any(v != "done" for v in statuses.values()):
            raise typer.Exit(1)

    app = typer.Typer(add_completion=False)
    app.command()(cli)
    try:
        app(args=argv)
    except SystemExit as e:  # typer exits; hand the code back to the caller
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

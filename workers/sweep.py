"""Run a whole experiment spec on Ray Tune: one trial per grid cell, results to a sink.

    python -m workers.sweep SPEC.json --out results.jsonl [--storage DIR] [--name NAME]

:func:`run_sweep` is the contract (docs/CONTRACTS.md). A FIFO grid (no early stopping) of
function trainables, each resuming from its latest Tune checkpoint; retries through
``FailureConfig``; results and cancellation handled by the driver-side callback of
``workers.tune_callback``. An experiment directory that Tune can restore is
restored (``Tuner.restore``): finished trials are not trained again, unfinished and errored
ones resume from their checkpoints, and the callback's saved state keeps every epoch from
reaching the sink twice.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import ray
import torch
from ray import tune

from .sinks import ResultSink
from .spec import ExperimentSpec, TrialSpec, parse_spec
from .storage import join, resolve_storage
from .train import run_trial
from .tune_callback import FINAL_KEY, PROVENANCE_KEY, SinkCallback, SweepBinding, SweepStopped, bound

STATE_FILE = "trial_state.pt"
CHECKPOINTS_KEPT = 1  # also forces an experiment snapshot after every checkpoint (see run_sweep)
FAULT_DIR_ENV = "BITBENCH_FAULT_DIR"  # tests only: see _fault_point


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
def _hook_dir() -> Path | None:
    root = os.environ.get(FAULT_DIR_ENV)
    return Path(root) / tune.get_context().get_experiment_name() if root else None


def _trace(key: str, line: str) -> None:
    """Tests only: append ``line`` to ``$BITBENCH_FAULT_DIR/<experiment>/<key>.log``."""
    d = _hook_dir()
    if d is not None:
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"{key}.log", "a") as f:
            f.write(line + "\n")


def _fault_point(key: str, epoch: int) -> None:
    """Tests only: raise once if ``$BITBENCH_FAULT_DIR/<experiment>/<key>.fail@<epoch>`` exists
    (the file is consumed, so the retry passes)."""
    d = _hook_dir()
    if d is None:
        return
    try:
        (d / f"{key}.fail@{epoch}").unlink()
    except FileNotFoundError:
        return
    raise RuntimeError(f"injected fault in epoch {epoch} of {key}")


def _load_state(checkpoint: tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d, STATE_FILE), map_location="cpu", weights_only=False)  # our own files


def bitbench_trial(config: dict, *, spec_json: str, data_dir: str | None) -> None:
    """Tune function trainable: ``config`` = {"trial": TrialSpec dict, "spec_hash": str}.

    Resumes from ``tune.get_checkpoint()``, reports every epoch with a checkpoint holding the
    full resume state, then reports ``{"final": {...}}`` once. The attempt's first report also
    carries its provenance (:mod:`workers.provenance`) as JSON text under ``"provenance"`` (one
    column for Tune's CSV and TensorBoard loggers).
    """
    spec = parse_spec(spec_json)
    if config["spec_hash"] != spec.spec_hash():
        raise ValueError("this experiment directory was started with a different spec; use another experiment name")
    trial = TrialSpec.model_validate(config["trial"])
    state = _load_state(tune.get_checkpoint())
    _trace(trial.key, f"start {state['epoch'] if state else 0}")

    unsent: dict[str, str] = {}  # the attempt's provenance, sent with its first report

    def on_start(record: dict) -> None:
        unsent[PROVENANCE_KEY] = json.dumps(record)

    def on_epoch(metrics: dict, epoch_state: dict) -> None:
        _trace(trial.key, f"trained {metrics['epoch']}")
        _fault_point(trial.key, metrics["epoch"])
        with tempfile.TemporaryDirectory(prefix="bitbench-ckpt-") as d:
            torch.save(epoch_state, Path(d, STATE_FILE))
            tune.report({**metrics, **unsent}, checkpoint=tune.Checkpoint.from_directory(d))
        unsent.clear()

    final = run_trial(spec, trial, on_epoch=on_epoch, on_start=on_start, resume_state=state, data_dir=data_dir,
                      threads=max(1, int(spec.resources.cpu)))
    tune.report({FINAL_KEY: final, **unsent})


def make_trainable(spec: ExperimentSpec, data_dir: str | os.PathLike | None = None):
    """``bitbench_trial`` with the spec and data directory bound and the spec's resources."""
    data = str(Path(data_dir).expanduser().resolve()) if data_dir is not None else None
    fn = tune.with_parameters(bitbench_trial, spec_json=spec.canonical_json(), data_dir=data)
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
    every checkpoint (``num_to_keep=1``), so at most an epoch in flight is trained again and
    the callback's saved state keeps it from reaching the sink twice.
    """
    storage = resolve_storage(storage_path)
    name = experiment_name or default_experiment_name(spec)
    exp_dir = join(storage, name)
    skip = set(skip_keys)
    grid = spec.trials()
    todo = [t for t in grid if t.key not in skip]
    restoring = tune.Tuner.can_restore(exp_dir)
    if not todo and not restoring:
        return {t.key: "skipped" for t in grid}

    ensure_ray(ray_address)
    # CheckpointConfig(num_to_keep=1) forces an experiment snapshot after every trial checkpoint:
    # the restore point and the callback's record of delivered epochs never lag. Tune warns about
    # frequent forced snapshots; this is on purpose.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    binding = SweepBinding(sink, stop_requested, device="cuda:0" if spec.resources.gpu > 0 else "cpu")
    trainable = make_trainable(spec, data_dir)
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

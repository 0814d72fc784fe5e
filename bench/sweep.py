"""A small sweep through Ray Tune against the same trials run one after another in one process.

    python bench/sweep.py [--epochs 10] [--cpus 2] [--repeats 1] [--modes pool,tune]

8 digits trials (4 estimators × W1A1, W2A2, one seed, 1 CPU each), these ways:

- *sequential*: ``workers.train.run_trial`` for each trial in this (warm) process, as configured
  (1 CPU, so 1 torch thread each) — the baseline;
- *sequential, all threads*: the same, each trial given all ``--cpus`` torch threads;
- *process pool*: ``--cpus`` fresh processes (spawned, so each pays its own imports, as Ray's
  workers do) taking the trials longest-first from one queue, no framework in between — the
  ceiling for running trials side by side on these cores;
- *Ray Tune* (``tune``): ``workers.sweep.run_sweep`` on a fresh local Ray with ``--cpus`` CPUs, Ray's
  start-up (``ray.init``) excluded (its median is printed); trials report short epochs in batches
  (``workers.sweep.REPORT_EVERY_S``);
- *Ray Tune, every epoch* (``tune-each``): the same with one report and checkpoint per epoch
  (``report_every_s=0``), as before batching (issue 16).

``--modes`` picks and orders them (``sequential``, ``threads``, ``pool``, ``tune``, ``tune-each``; default all
but ``tune-each``).
Prints markdown tables with wall times and speed-ups against the first mode, and each run's
Tune / pool ratio (target ≤ 1.05).
``--repeats N`` runs the modes in turn N times (a shared machine's speed drifts between minutes) and
reports medians, with every run listed, and the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.sinks import MemorySink  # noqa: E402
from workers.spec import ExperimentSpec, TrialSpec, parse_spec  # noqa: E402
from workers.sweep import longest_first, run_sweep  # noqa: E402
from workers.train import run_trial  # noqa: E402


def bench_spec(epochs: int) -> ExperimentSpec:
    return parse_spec({
        "name": "bench-sweep", "dataset": "digits", "model": "digits_net",
        "estimators": ["aqe", "ste", "clipped_ste", "approx_sign"], "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}],
        "include_full_precision": False, "epochs": epochs, "batch_size": 128, "resources": {"cpu": 1},
    })


def one_after_another(spec: ExperimentSpec, threads: int) -> float:
    t0 = time.perf_counter()
    for t in spec.trials():
        run_trial(spec, t, on_epoch=lambda m, s: None, threads=threads)
    return time.perf_counter() - t0


def _train_one(spec_json: str, trial_json: str) -> int:
    """One trial in a pool process (1 torch thread); returns the epochs trained."""
    spec, trial = parse_spec(spec_json), TrialSpec.model_validate_json(trial_json)
    epochs = []
    run_trial(spec, trial, on_epoch=lambda m, s: epochs.append(m["epoch"]), threads=1)
    return len(epochs)


def process_pool(spec: ExperimentSpec, cpus: int) -> float:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(cpus, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_train_one, spec.canonical_json(), t.model_dump_json())
                for t in longest_first(spec.trials())]
        assert sum(j.result() for j in jobs) == spec.trial_count() * spec.epochs
    return time.perf_counter() - t0


def through_ray(spec: ExperimentSpec, cpus: int, report_every_s: float | None = None) -> tuple[float, float]:
    """(run_sweep seconds, ray.init seconds) on a fresh local Ray."""
    import ray

    torch.set_num_threads(cpus)
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as storage:
        sink = MemorySink(strict=True)
        t0 = time.perf_counter()
        statuses = run_sweep(spec, sink, storage_path=storage, experiment_name="bench", report_every_s=report_every_s)
        tuned = time.perf_counter() - t0
    ray.shutdown()
    assert set(statuses.values()) == {"done"}, statuses
    assert sum(len(v) for v in sink.epochs.values()) == spec.trial_count() * spec.epochs
    return tuned, ray_init


MODES = {
    "sequential": "sequential, one process, as configured (1 CPU = 1 torch thread each)",
    "threads": "sequential, one process, {cpus} torch threads each",
    "pool": "process pool: {cpus} fresh processes × 1 thread, longest first, no framework",
    "tune": "Ray Tune, {cpus} trials × 1 CPU (run_sweep)",
    "tune-each": "Ray Tune, {cpus} trials × 1 CPU, one report per epoch (report_every_s = 0)",
}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the modes in turn N times; report medians")
    p.add_argument("--modes", default="sequential,threads,pool,tune",
                   help=f"comma-separated, run in this order each repeat, from: {', '.join(MODES)}")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown modes: {', '.join(sorted(unknown))}")
    spec = bench_spec(args.epochs)
    run_mode = {
        "sequential": lambda: one_after_another(spec, 1),
        "threads": lambda: one_after_another(spec, args.cpus),
        "pool": lambda: process_pool(spec, args.cpus),
        "tune": lambda: through_ray(spec, args.cpus),
        "tune-each": lambda: through_ray(spec, args.cpus, report_every_s=0),
    }

    load_before = load_average()
    runs: list[dict[str, float]] = []
    ray_init: list[float] = []
    for _ in range(args.repeats):
        run = {}
        for mode in modes:
            out = run_mode[mode]()
            if isinstance(out, tuple):
                out, init = out
                ray_init.append(init)
            run[mode] = out
        runs.append(run)
    wall = {m: statistics.median(r[m] for r in runs) for m in modes}
    base_mode = modes[0]

    cmd = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"`python bench/sweep.py {cmd}` ({spec.trial_count()} digits trials × {args.epochs} epochs, "
          f"{args.cpus} CPUs{f', medians of {args.repeats} runs' if args.repeats > 1 else ''}; "
          f"load average {load_before} at the start, {load_average()} at the end)\n")
    print(f"| mode | wall s | speed-up vs {base_mode} |")
    print("|---|---:|---:|")
    for mode in modes:
        print(f"| {MODES[mode].format(cpus=args.cpus)} | {wall[mode]:.1f} | {wall[base_mode] / wall[mode]:.2f} |")
    if ray_init:
        print(f"\nray.init (excluded above): median {statistics.median(ray_init):.1f} s")
    if "pool" in modes:
        for tune_mode in ("tune", "tune-each"):
            if tune_mode in modes:
                each = sorted(r[tune_mode] / r["pool"] for r in runs)
                print(f"\n{tune_mode} / pool wall time, per run: {', '.join(f'{x:.3f}' for x in each)} "
                      f"(median {statistics.median(each):.3f}; target ≤ 1.05)")
    if args.repeats > 1:
        print("\n| run | " + " | ".join(f"{m} s" for m in modes) + " |")
        print("|---|" + "---:|" * len(modes))
        for i, r in enumerate(runs, 1):
            print(f"| {i} | " + " | ".join(f"{r[m]:.1f}" for m in modes) + " |")


if __name__ == "__main__":
    main()

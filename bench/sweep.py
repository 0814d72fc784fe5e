"""A small sweep through Ray Tune against the same trials run one after another in one process.

    python bench/sweep.py [--epochs 10] [--cpus 2] [--repeats 1]

8 digits trials (4 estimators × W1A1, W2A2, one seed, 1 CPU each), four ways:

- *sequential*: ``workers.train.run_trial`` for each trial in this (warm) process, as configured
  (1 CPU, so 1 torch thread each) — the baseline;
- *sequential, all threads*: the same, each trial given all ``--cpus`` torch threads;
- *process pool*: ``--cpus`` fresh processes (spawned, so each pays its own imports, as Ray's
  workers do) taking the trials longest-first from one queue, no framework in between — the
  ceiling for running trials side by side on these cores;
- *Ray Tune*: ``workers.sweep.run_sweep`` on a local Ray with ``--cpus`` CPUs, with Ray's start-up
  excluded and included.

Prints markdown tables with wall times and speed-ups (target ≥ 1.7× on 2 CPUs against the same
trials run one after another). ``--repeats N`` runs the four modes in turn N times (a shared VM's
speed drifts by several per cent between minutes) and reports medians, with every run listed.
"""
from __future__ import annotations

import argparse
import multiprocessing
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


def through_ray(spec: ExperimentSpec, cpus: int) -> tuple[float, float]:
    """(run_sweep seconds, ray.init seconds) on a fresh local Ray."""
    import ray

    torch.set_num_threads(cpus)
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as storage:
        sink = MemorySink(strict=True)
        t0 = time.perf_counter()
        statuses = run_sweep(spec, sink, storage_path=storage, experiment_name="bench")
        tuned = time.perf_counter() - t0
    ray.shutdown()
    assert set(statuses.values()) == {"done"}, statuses
    assert sum(len(v) for v in sink.epochs.values()) == spec.trial_count() * spec.epochs
    return tuned, ray_init


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the four modes in turn N times; report medians")
    args = p.parse_args(argv)
    spec = bench_spec(args.epochs)

    runs = []
    for _ in range(args.repeats):
        runs.append((one_after_another(spec, 1), one_after_another(spec, args.cpus),
                     process_pool(spec, args.cpus), *through_ray(spec, args.cpus)))
    seq, all_threads, pool, tuned, ray_init = (statistics.median(col) for col in zip(*runs, strict=False))

    cmd = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"`python bench/sweep.py {cmd}` ({spec.trial_count()} digits trials × {args.epochs} epochs, "
          f"{args.cpus} CPUs{f', medians of {args.repeats} runs' if args.repeats > 1 else ''})\n")
    print("| mode | wall s | speed-up vs sequential |")
    print("|---|---:|---:|")
    for label, wall in [
        ("sequential, one process, as configured (1 CPU = 1 torch thread each)", seq),
        (f"sequential, one process, {args.cpus} torch threads each", all_threads),
        (f"process pool: {args.cpus} fresh processes × 1 thread, longest first, no framework", pool),
        (f"Ray Tune, {args.cpus} trials × 1 CPU (run_sweep)", tuned),
        (f"Ray Tune incl. ray.init ({ray_init:.1f} s)", tuned + ray_init),
    ]:
        print(f"| {label} | {wall:.1f} | {seq / wall:.2f} |")
    print(f"\nspeed-up: {seq / tuned:.2f}× over the same trials one after another (target ≥ 1.7×); "
          f"the bare process pool reaches {seq / pool:.2f}×")
    if args.repeats > 1:
        print("\n| run | sequential s | all threads s | process pool s | Ray Tune s | Ray speed-up | pool speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for i, (s, a, pl, tn, _) in enumerate(runs, 1):
            print(f"| {i} | {s:.1f} | {a:.1f} | {pl:.1f} | {tn:.1f} | {s / tn:.2f} | {s / pl:.2f} |")


if __name__ == "__main__":
    main()

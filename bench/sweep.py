"""A small sweep through Ray Tune against the same trials run one after another in one process.

    python bench/sweep.py [--epochs 10] [--cpus 2]

8 digits trials (4 estimators × W1A1, W2A2, one seed, 1 CPU each). Two sequential baselines run
``workers.train.run_trial`` for each trial in this process: the same trials as configured
(1 CPU, so 1 torch thread each), and each trial given all ``--cpus`` threads. Then the same spec
goes through ``workers.sweep.run_sweep`` on a local Ray with ``--cpus`` CPUs. Prints a markdown
table with wall times and speed-ups (target ≥ 1.7× on 2 CPUs against the same trials run one
after another), with Ray's start-up excluded and included.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.sinks import MemorySink  # noqa: E402
from workers.spec import parse_spec  # noqa: E402
from workers.sweep import run_sweep  # noqa: E402
from workers.train import run_trial  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args(argv)
    spec = parse_spec({
        "name": "bench-sweep", "dataset": "digits", "model": "digits_net",
        "estimators": ["aqe", "ste", "clipped_ste", "approx_sign"], "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}],
        "include_full_precision": False, "epochs": args.epochs, "batch_size": 128, "resources": {"cpu": 1},
    })
    trials = spec.trials()

    def one_after_another(threads: int) -> float:
        t0 = time.perf_counter()
        for t in trials:
            run_trial(spec, t, on_epoch=lambda m, s: None, threads=threads)
        return time.perf_counter() - t0

    sequential = one_after_another(int(spec.resources.cpu))
    all_threads = one_after_another(args.cpus)
    torch.set_num_threads(args.cpus)

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_init = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as storage:
        sink = MemorySink(strict=True)
        t0 = time.perf_counter()
        statuses = run_sweep(spec, sink, storage_path=storage, experiment_name="bench")
        tuned = time.perf_counter() - t0
    ray.shutdown()
    assert set(statuses.values()) == {"done"}, statuses
    assert sum(len(v) for v in sink.epochs.values()) == len(trials) * args.epochs

    cmd = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"`python bench/sweep.py {cmd}` ({len(trials)} digits trials × {args.epochs} epochs, {args.cpus} CPUs)\n")
    print("| mode | wall s | speed-up vs sequential |")
    print("|---|---:|---:|")
    print(f"| sequential, one process, as configured (1 CPU = 1 torch thread each) | {sequential:.1f} | 1.00 |")
    print(f"| sequential, one process, {args.cpus} torch threads each | {all_threads:.1f} | "
          f"{sequential / all_threads:.2f} |")
    print(f"| Ray Tune, {args.cpus} trials × 1 CPU (run_sweep) | {tuned:.1f} | {sequential / tuned:.2f} |")
    print(f"| Ray Tune incl. ray.init ({ray_init:.1f} s) | {tuned + ray_init:.1f} | "
          f"{sequential / (tuned + ray_init):.2f} |")
    print(f"\nspeed-up: {sequential / tuned:.2f}× over the same trials one after another (target ≥ 1.7×); "
          f"{all_threads / tuned:.2f}× over one after another with {args.cpus} threads each")


if __name__ == "__main__":
    main()

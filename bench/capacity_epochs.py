"""Epoch time of Models A–D on Fashion-MNIST at several width divisors, with the real trainer on one thread.

    python bench/capacity_epochs.py [--divisors 4 8 16] [--models convnet_a ...] [--train-size 5000]
                                    [--cells float aqe:1 clipped_ste:1 aqe:2] [--out FILE.json]

Each cell is one trial of two epochs trained by ``workers.train.run_trial`` exactly as a sweep trial would
be (real Fashion-MNIST, default 5,000-image validation split, the 10,000-image test set, batch 256, Adam),
on one intra-op thread. Timed in process CPU seconds (on a shared machine far steadier than wall time; with
one thread, the wall time an otherwise idle core would take): the second epoch's (``epoch_cpu_s``), split by
the trainer's own wall-time shares into training (``train_cpu_s``) and the rest (``eval_cpu_s``: validation,
test, and the soft-forward validation pass of estimators that have one), and what the trial spent outside
its epochs (``other_cpu_s``: loading, building, the packed check). The study's arithmetic scales
``train_cpu_s`` with the training-set size; ``eval_cpu_s`` does not change with it. The load average is
printed beside each cell.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.spec import ExperimentSpec  # noqa: E402
from workers.train import run_trial  # noqa: E402


def cell_spec(model: str, divisor: int, cell: str, train_size: int) -> ExperimentSpec:
    """A one-trial, two-epoch spec: ``float`` or ``estimator:bits`` (W = A = bits)."""
    name, _, bits = cell.partition(":")
    grid = ({"estimators": ["clipped_ste"], "bits": [{"w": 1, "a": 1}], "include_full_precision": True}
            if name == "float" else {"estimators": [name], "bits": [{"w": int(bits), "a": int(bits)}]})
    return ExperimentSpec.model_validate({
        "name": "capacity epoch time", "dataset": "fashion_mnist", "model": model,
        "model_options": {"width_divisor": divisor}, "seeds": [0], "epochs": 2, "batch_size": 256,
        "optimizer": {"name": "adam", "lr": 0.005}, "dataset_options": {"train_size": train_size}, **grid})


def measure(model: str, divisor: int, cell: str, train_size: int) -> dict:
    spec = cell_spec(model, divisor, cell, train_size)
    trial = next(t for t in spec.trials() if t.is_float == (cell == "float"))
    epochs: list[tuple[dict, float]] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    final = run_trial(spec, trial, on_epoch=lambda m, _s: epochs.append((m, time.process_time())), threads=1,
                      device="cpu")
    trial_s, trial_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    (_, first_cpu), (m, second_cpu) = epochs
    train_share = train_size / m["images_per_s"] / m["epoch_seconds"]
    epoch_cpu = second_cpu - first_cpu
    return {"model": model, "divisor": divisor, "cell": cell, "train_size": train_size,
            "weights_1bit": final["weight_bits_total"] // (1 if cell == "float" else int(cell.split(":")[1])),
            "epoch_wall_s": m["epoch_seconds"], "epoch_cpu_s": epoch_cpu, "train_cpu_s": epoch_cpu * train_share,
            "eval_cpu_s": epoch_cpu * (1 - train_share), "other_cpu_s": trial_cpu - 2 * epoch_cpu,
            "trial_wall_s": trial_s, "trial_cpu_s": trial_cpu, "test_acc": m["test_acc"],
            "load_avg": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["convnet_a", "convnet_b", "convnet_c", "convnet_d"])
    ap.add_argument("--divisors", nargs="+", type=int, default=[4, 8, 16])
    ap.add_argument("--cells", nargs="+", default=["float", "aqe:1", "clipped_ste:1", "aqe:2"])
    ap.add_argument("--train-size", type=int, default=5000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    print("command: python bench/capacity_epochs.py " + shlex.join(sys.argv[1:]), flush=True)
    rows = []
    for divisor in args.divisors:
        for model in args.models:
            for cell in args.cells:
                r = measure(model, divisor, cell, args.train_size)
                rows.append(r)
                print(json.dumps(r), flush=True)
                if args.out:
                    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

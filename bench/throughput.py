"""CPU training throughput of every estimator against float (synthetic 3×32×32 images).

    python bench/throughput.py [--models convnet_d resnet20] [--batch 64] [--batches 2] [--out FILE.md]

For each model: images per second of training steps (forward, backward, Adam step, latent-weight
clip: ``workers.train.train_epoch``) at float and, per estimator, at W1A1 and W2A2, with the
ratio to float. Timed in process CPU seconds, best of --repeats, on --threads threads (default
1): on a shared machine CPU time is far steadier than wall time, and with one thread it equals
the wall time an otherwise idle core would take. Prints a markdown table (and writes it to --out)
headed by the command that made it.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import estimators  # noqa: E402
from workers.datasets import load_dataset  # noqa: E402
from workers.models import create_model  # noqa: E402
from workers.spec import Optimizer  # noqa: E402
from workers.train import build_optimizer, train_epoch  # noqa: E402

FLOAT = estimators.FLOAT_BITS


def images_per_s(model_name: str, data, w: int, a: int, estimator: str | None, batch: int, batches: int,
                 repeats: int) -> float:
    """Training images per CPU second over ``batches`` batches (best of ``repeats``) after a warm-up batch."""
    torch.manual_seed(0)
    quant = {"estimator": estimator} if estimator else {}
    model = create_model(model_name, num_classes=data.num_classes, input_shape=data.input_shape,
                         w_bits=w, a_bits=a, **quant)
    opt = build_optimizer(model.parameters(), Optimizer())
    xs = [(data.train_x[i * batch:(i + 1) * batch], data.train_y[i * batch:(i + 1) * batch])
          for i in range(batches + 1)]
    train_epoch(model, opt, xs[:1])  # warm-up (allocations, lazy init)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        _, _, n = train_epoch(model, opt, xs[1:])
        best = min(best, time.process_time() - t0)
    return n / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["convnet_d", "resnet20"])
    p.add_argument("--estimators", nargs="+", default=estimators.list_estimators())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=2, help="timed batches per repeat (after one warm-up batch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_dataset("synthetic", shape=(3, 32, 32), n_train=args.batch * (args.batches + 1), n_val=0, n_test=1)

    lines = [f"`python bench/throughput.py {shlex.join(sys.argv[1:] if argv is None else argv)}` "
             f"(CPU, {args.threads} thread(s), batch {args.batch}, images per CPU-second, best of {args.repeats}, "
             f"torch {torch.__version__})", "",
             "| model | estimator | W1A1 img/s | W1A1 ×float | W2A2 img/s | W2A2 ×float |",
             "|---|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for model_name in args.models:
        ref = images_per_s(model_name, data, FLOAT, FLOAT, None, args.batch, args.batches, args.repeats)
        row = f"| {model_name} | float | {ref:.0f} | 1.00 | {ref:.0f} | 1.00 |"
        lines.append(row)
        print(row, flush=True)
        for est in args.estimators:
            cells = []
            for bits in (1, 2):
                try:
                    ips = images_per_s(model_name, data, bits, bits, est, args.batch, args.batches, args.repeats)
                    cells += [f"{ips:.0f}", f"{ips / ref:.2f}"]
                except ValueError as e:  # an estimator that does not support these bits
                    cells += [f"n/a ({str(e)[:40]})", "–"]
            row = f"| {model_name} | {est} | " + " | ".join(cells) + " |"
            lines.append(row)
            print(row, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

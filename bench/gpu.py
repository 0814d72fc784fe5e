"""GPU training throughput with 1, 2 and 4 trials sharing one GPU (what fractional GPUs buy).

    python bench/gpu.py [--models convnet_a resnet20] [--shares 1 2 4] [--epochs 3] [--budget-s 540]

convnet_a and resnet20 at W1A1 with aqe on synthetic CIFAR-shaped data (3×32×32, kept on the
GPU), trained by ``workers.train.run_trial`` exactly as a sweep trial would be. For each share
count k, k processes train at once on the same GPU; the table gives images/s per trial (median
over epochs after the first) and their sum. On a GPU it records each model's images/s of one trial
alone in bench/gpu_figures.json (``--record``), the figures a dry run's time estimate uses
(``workers.plan``). Prints the card's name; exits cleanly (code 0)
without a GPU. Stops starting new cells once --budget-s is spent. ``--device cpu`` runs the same
code on the CPU (a smoke test of the script, not a benchmark).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    """One trial; prints one JSON line per epoch: {"epoch", "images_per_s"}."""
    from workers.spec import parse_spec
    from workers.train import run_trial

    spec = parse_spec({
        "name": "bench-gpu", "dataset": "synthetic", "model": args.model, "estimators": ["aqe"],
        "bits": [{"w": 1, "a": 1}], "include_full_precision": False, "epochs": args.epochs, "batch_size": args.batch,
        "dataset_options": {"shape": [3, 32, 32], "n_train": args.n_train, "n_val": 0, "n_test": 1000},
        "resources": {"cpu": 1, "gpu": 1 / args.share if args.device == "cuda" else 0},
    })

    def on_epoch(metrics, state):
        print(json.dumps({"epoch": metrics["epoch"], "images_per_s": metrics["images_per_s"],
                          "device": metrics["device"]}), flush=True)

    run_trial(spec, spec.trials()[0], on_epoch=on_epoch, device=args.device, threads=1)


def run_cell(args, model: str, share: int) -> list[float]:
    """Start ``share`` workers at once; return each one's median images/s (epochs ≥ 2)."""
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--share", str(share), "--epochs", str(args.epochs),
           "--batch", str(args.batch), "--n-train", str(args.n_train), "--device", args.device]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(share)]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}): {' '.join(cmd)}")
        epochs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        later = [e["images_per_s"] for e in epochs if e["epoch"] >= 2] or [e["images_per_s"] for e in epochs]
        rates.append(statistics.median(later))
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["convnet_a", "resnet20"])
    p.add_argument("--shares", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n-train", type=int, default=10240)
    p.add_argument("--budget-s", type=float, default=540.0, help="start no new cell after this many seconds")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--record", type=Path, default=ROOT / "bench" / "gpu_figures.json",
                   help="where to record the single-trial images/s per model (on a GPU only)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--share", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to measure")
        return 0
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (smoke test)"
    cmd = shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"`python bench/gpu.py {cmd}` on {card}, torch {torch.__version__}; W1A1 aqe, batch {args.batch}, "
          f"{args.n_train} synthetic 3×32×32 images per epoch\n")
    print("| model | trials sharing the GPU | images/s per trial | total images/s | total vs 1 trial |")
    print("|---|---:|---:|---:|---:|", flush=True)
    start = time.monotonic()
    alone: dict[str, float] = {}
    for model in args.models:
        single = None
        for share in args.shares:
            if time.monotonic() - start > args.budget_s:
                print(f"| {model} | {share} | (skipped: budget spent) | | |", flush=True)
                continue
            rates = run_cell(args, model, share)
            total = sum(rates)
            single = single or (total if share == 1 else None)
            if share == 1:
                alone[model] = total
            ratio = f"{total / single:.2f}" if single else "–"
            print(f"| {model} | {share} | {statistics.mean(rates):.0f} | {total:.0f} | {ratio} |", flush=True)
    if args.device == "cuda" and alone:
        args.record.write_text(json.dumps({"card": card, "torch": torch.__version__, "command": f"python bench/gpu.py "
                                           f"{cmd}", "batch": args.batch, "images_per_s": alone}, indent=2) + "\n")
        print(f"\nrecorded {args.record}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

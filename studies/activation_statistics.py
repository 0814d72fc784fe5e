"""Activation statistics of the MINW quantizers, measured: accuracy and batch independence per mode.

    nice -n 10 python studies/activation_statistics.py [--spec studies/activation_statistics.json]
        [--out docs/results/activation_statistics/trials.jsonl] [--check 2000]

Trains every trial of the spec with the real trainer (``workers.train.run_trial``, one thread, CPU),
then loads its final weights into a fresh model and predicts the first ``--check`` test images in
eval mode twice: in batches of the spec's batch size (as the trainer evaluates) and one image at a
time. ``agreement`` is the fraction of images with the same predicted class. One JSON line per
trial goes to ``--out`` (trials already there are skipped, so an interrupted run continues), and
the summary table (mean ± sd over seeds) is printed as Markdown.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from workers.datasets import load_dataset
from workers.spec import ExperimentSpec, parse_spec
from workers.train import build_model, run_trial


@torch.no_grad()
def batch_agreement(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> float:
    """Fraction of ``x`` whose eval-mode class is the same in batches of ``batch_size`` and alone."""
    model.eval()
    batched = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    alone = torch.cat([model(x[i:i + 1]).argmax(1) for i in range(len(x))])
    return float((batched == alone).double().mean())


def run(spec: ExperimentSpec, out: Path, check: int) -> None:
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.exists() else set()
    for trial in spec.trials():
        if trial.key in done:
            continue
        t0 = time.perf_counter()
        last: dict = {}
        final = run_trial(spec, trial, on_epoch=lambda m, s, last=last: last.update(state=s), device="cpu", threads=1)
        data = load_dataset(spec.dataset, seed=trial.seed, **dict(spec.dataset_options))
        model = build_model(spec, trial, data)
        model.load_state_dict(last["state"]["model"])
        x, _ = data.head("test", check)
        row = {"key": trial.key, "act_stats": trial.estimator_params.get("act_stats"), "w_bits": trial.w_bits,
               "a_bits": trial.a_bits, "seed": trial.seed, "final_test_acc": final["final_test_acc"],
               "agreement": batch_agreement(model, x, spec.batch_size), "checked": len(x),
               "packed_agreement": final["packed_agreement"], "seconds": time.perf_counter() - t0}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _mean_sd(values: list[float], scale: float = 100.0) -> str:
    sd = statistics.stdev(values) * scale if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values) * scale:.2f} ± {sd:.2f}"


def table(out: Path) -> str:
    """Markdown: one row per (bits, mode) with mean ± sd over seeds."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["w_bits"], r["a_bits"], r["act_stats"]), []).append(r)
    lines = ["| bits | act_stats | n | test accuracy (%) | batch vs single-image agreement (%) | "
             "packed engine agreement (%) |", "|---|---|---:|---:|---:|---:|"]
    for (w, a, mode), rs in sorted(groups.items()):
        packed = [r["packed_agreement"] for r in rs if r["packed_agreement"] is not None]
        lines.append(f"| W{w}A{a} | `{mode}` | {len(rs)} | {_mean_sd([r['final_test_acc'] for r in rs])} | "
                     f"{_mean_sd([r['agreement'] for r in rs])} | {_mean_sd(packed) if packed else '—'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=Path("studies/activation_statistics.json"))
    ap.add_argument("--out", type=Path, default=Path("docs/results/activation_statistics/trials.jsonl"))
    ap.add_argument("--check", type=int, default=2000, help="test images checked for batch independence")
    ap.add_argument("--table", action="store_true", help="only print the table of --out")
    a = ap.parse_args()
    if not a.table:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        run(parse_spec(a.spec.read_text()), a.out, a.check)
    print(table(a.out), end="")


if __name__ == "__main__":
    main()

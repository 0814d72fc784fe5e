"""CPU training throughput of every estimator against float (synthetic 3×32×32 images).

    python bench/throughput.py [--models convnet_d resnet20] [--estimators ste aqe] [--bits 1 2] [--batch 64]
                               [--batches 2] [--repeats 7] [--threads 1] [--clock cpu|wall] [--progress 50]
                               [--compile on|auto|off] [--baseline DIR] [--out FILE.md]

For each model: images per second of training steps (forward, backward, Adam step, latent-weight clip:
``workers.train.train_epoch``) at float and, per estimator, at each WbAb of ``--bits``, with the ratio to
float and the MiB one training forward keeps for the backward (distinct storages). Every cell of a model is
built first and then timed in ``--repeats`` rounds, each cell once per round in a shuffled order (medians), so
slow minutes of a shared machine hit every cell alike; a second float model ("float (control)") shows how far
two identical rows drift apart. Timed in process CPU seconds on --threads threads (default 1): on a shared
machine CPU time is far steadier than wall time, and with one thread it equals the wall time an otherwise idle
core would take; ``--clock wall`` times wall seconds (for several threads on a quiet machine: the process's
CPU time would count each thread's waits and spins). ``--compile`` sets ``BITBENCH_COMPILE`` for the package's
estimators (``estimators.compiled``): ``on`` (default) times the steady state a run reaches once its compiled
pseudo-gradients are hot, ``auto`` what a bench this short would see. ``--baseline DIR`` adds every estimator
row again with the ``estimators`` package found in DIR (e.g. ``git archive COMMIT estimators | tar -x -C
DIR``), its estimators put into the same models in this process, so before and after are measured in the same
run.
Prints a markdown table (and writes it to --out) headed by the command that made it and the load average.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import estimators  # noqa: E402
from estimators import compiled  # noqa: E402
from workers.datasets import load_dataset  # noqa: E402
from workers.malloc import keep_freed_memory  # noqa: E402
from workers.models import create_model  # noqa: E402
from workers.spec import Optimizer  # noqa: E402
from workers.train import build_optimizer, train_epoch  # noqa: E402

FLOAT = estimators.FLOAT_BITS


def load_baseline(directory: str):
    """The ``estimators`` package in ``directory`` beside this one (bench/estimators.py's loader)."""
    spec = importlib.util.spec_from_file_location("bench_estimators", Path(__file__).with_name("estimators.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_estimators(directory)


def with_estimators(model: nn.Module, package) -> nn.Module:
    """``model`` with every estimator rebuilt from ``package`` (same name, bits, role and parameters)."""
    for m in model.modules():
        for attr in ("quantizer", "weight_quantizer"):
            est = getattr(m, attr, None)
            if isinstance(est, estimators.Estimator):
                setattr(m, attr, package.create_estimator(est.name, bits=est.bits, role=est.role, **est.hparams))
    return model


def saved_for_backward_mib(model: nn.Module, x: torch.Tensor) -> float:
    """MiB of the distinct storages a training forward of ``model`` on ``x`` keeps for its backward (the
    activation memory of a step, parameters included)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values()) / 2**20


def training_cell(model_name: str, data, bits: int, estimator: str | None, package, batches, progress: int = 0):
    """A function running ``train_epoch`` over ``batches`` on a fresh model (after one warm-up batch), its
    scheduled estimators at epoch ``progress`` of 100, and the MiB its training forward keeps for the backward
    (:func:`saved_for_backward_mib` on the warm-up batch)."""
    torch.manual_seed(0)
    quant = {"estimator": estimator} if estimator else {}
    model = create_model(model_name, num_classes=data.num_classes, input_shape=data.input_shape,
                         w_bits=bits, a_bits=bits, **quant)
    if package is not None:
        with_estimators(model, package)
    (package or estimators).set_progress(model, progress, 100)  # a package reaches only its own estimators
    opt = build_optimizer(model.parameters(), Optimizer())
    train_epoch(model, opt, batches[:1])  # warm-up (allocations, lazy init, LSQ's step)
    saved = saved_for_backward_mib(model, batches[0][0])
    return (lambda: train_epoch(model, opt, batches[1:])[2]), saved


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def median_images_per_s(cells: dict, repeats: int, clock=time.process_time) -> dict[str, float]:
    """Images per second of ``clock`` for each cell: median over ``repeats`` interleaved rounds (shuffled each
    round)."""
    times: dict[str, list[float]] = {k: [] for k in cells}
    images: dict[str, int] = {}
    order = list(cells)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            t0 = clock()
            images[k] = cells[k]()
            times[k].append(clock() - t0)
    return {k: images[k] / statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["convnet_d", "resnet20"])
    p.add_argument("--estimators", nargs="+", default=estimators.list_estimators())
    p.add_argument("--bits", nargs="+", type=int, default=[1, 2], help="WbAb bit widths, one column pair each")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=2, help="timed batches per round (after one warm-up batch)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="the process's CPU time or wall time")
    p.add_argument("--progress", type=int, default=50, metavar="PERCENT",
                   help="training progress of scheduled estimators (EDE's t, ReSTE's o, AQE's α): their cost can "
                        "depend on it (ReSTE's power is free at o = 1, the first epoch's value)")
    p.add_argument("--compile", choices=compiled.MODES, default="on",
                   help="BITBENCH_COMPILE for the package's estimators (on: the steady state of a long run)")
    p.add_argument("--baseline", metavar="DIR", help="also time every estimator with the estimators package in DIR")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    for name in args.estimators:
        estimators.get_estimator_class(name)  # an unknown name fails here, listing the known ones
    torch.set_num_threads(args.threads)
    compiled.MODE = args.compile
    keep_freed_memory()  # as training does (workers.malloc)
    baseline = load_baseline(args.baseline) if args.baseline else None
    if getattr(baseline, "compiled", None) is not None:  # an older package with compiled formulas: the same mode
        baseline.compiled.MODE = args.compile
    data = load_dataset("synthetic", shape=(3, 32, 32), n_train=args.batch * (args.batches + 1), n_val=0, n_test=1)
    batches = [(data.train_x[i * args.batch:(i + 1) * args.batch], data.train_y[i * args.batch:(i + 1) * args.batch])
               for i in range(args.batches + 1)]

    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    head = " | ".join(f"W{b}A{b} img/s | W{b}A{b} ×float | W{b}A{b} saved MiB" for b in args.bits)
    lines = [f"`python bench/throughput.py {shlex.join(sys.argv[1:] if argv is None else argv)}` "
             f"(CPU, {args.threads} thread(s), batch {args.batch}, images per {args.clock} second, "
             f"medians of {args.repeats} "
             f"interleaved rounds, scheduled estimators at {args.progress} % of training, compile {args.compile}, "
             f"torch {torch.__version__}, "
             f"load average {load} at the start)", "",
             f"| model | estimator | {head} |", "|---|---|" + "---:|---:|---:|" * len(args.bits)]
    print("\n".join(lines), flush=True)
    variants = [("", None)] + ([(" (baseline)", baseline)] if baseline else [])
    for model_name in args.models:
        cells = {"float": training_cell(model_name, data, FLOAT, None, None, batches),
                 "float (control)": training_cell(model_name, data, FLOAT, None, None, batches)}
        skipped: dict[str, str] = {}
        for est in args.estimators:
            for suffix, package in variants:
                for b in args.bits:
                    key = f"{est}{suffix} W{b}"
                    try:
                        cells[key] = training_cell(model_name, data, b, est, package, batches, args.progress)
                    except ValueError as e:  # an estimator that does not support these bits
                        skipped[key] = str(e)[:40]
        saved = {k: mib for k, (_, mib) in cells.items()}
        ips = median_images_per_s({k: run for k, (run, _) in cells.items()}, args.repeats, CLOCKS[args.clock])
        ref = ips["float"]
        rows = [(k, [k] * len(args.bits)) for k in ("float", "float (control)")]
        rows += [(f"{est}{suffix}", [f"{est}{suffix} W{b}" for b in args.bits])
                 for est in args.estimators for suffix, _ in variants]
        for label, keys in rows:
            cells_md = [f"{ips[k]:.0f} | {ips[k] / ref:.2f} | {saved[k]:.1f}" if k in ips else "n/a | – | –"
                        for k in keys]
            row = f"| {model_name} | {label} | " + " | ".join(cells_md) + " |"
            lines.append(row)
            print(row, flush=True)
        if skipped:
            print(f"(not run: {skipped})", flush=True)
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    lines += ["", f"load average {load} at the end"]
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Pseudo-gradients compiled into one loop against eager (``estimators.compiled``), and what the compile costs.

    python bench/compiled.py [--threads 1] [--repeats 31] [--epoch-images 50000]

First, ms per Mi elements of ReSTE's, EDE's and ApproxSign's pseudo-gradients (scheduled ones at 50 % of
training): eager (the estimator with ``BITBENCH_COMPILE`` off) and as one compiled loop (ReSTE: the
package's kernel; EDE and ApproxSign: their formulas written for ``torch.compile`` here, the candidates
measured and left eager), on resnet20's largest and smallest activations at batch 64, medians of
interleaved calls. Then a forward candidate in context: the ternary Q (hardshrink, sign) against one
compiled loop on a HardTanh output, called back to back and with the next conv between calls (measured and
left eager, BENCHMARKS.md). Then the first compile of a process, in fresh processes with an empty Inductor
cache (cold) and again with that cache (warm), and a further formula's compile in the same process. With
``--epoch-images N``, last, the wall seconds of one training epoch of N synthetic 3×32×32 images (batch 64,
resnet20 at W2A2, ReSTE at 50 % of training) in fresh processes: eager (``off``), then ``auto`` with an empty
Inductor cache and ``auto`` with that cache warm: what the compile costs a first epoch against what it saves.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import estimators  # noqa: E402
from estimators import compiled, quantizers  # noqa: E402
from workers.malloc import keep_freed_memory  # noqa: E402

SHAPES = [(64, 16, 32, 32), (64, 64, 8, 8)]  # resnet20's largest and smallest activations at batch 64


def ede_candidate(x, g, minus_2t, scale):
    """EDE's g·4kt·σ(−2t|x|)·(1 − σ(−2t|x|)) as one loop (not in the package: too little to gain)."""
    s = torch.sigmoid(x.abs() * minus_2t)
    return g * (1 - s) * s * scale


def approx_sign_candidate(x, g):
    """ApproxSign's g·max(2 − 2|x|, 0) as one loop (not in the package: too little to gain)."""
    return (2 - 2 * x.abs()).clamp_min(0) * g


def ternary_candidate(x, delta):
    """The ternary Q, where(|x| > Δ, sign(x), +0), as one loop (not in the package: it loses in a network)."""
    return torch.where(x.abs() > delta, torch.sign(x), 0.0)


def in_context(repeats: int) -> list[tuple[str, float, float]]:
    """(what runs between calls, eager µs, compiled µs) of the ternary Q on resnet20's largest activation, just
    written by HardTanh as in the network: calls back to back, and with the next layer's conv between them."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)
    x0 = torch.randn(SHAPES[0], generator=torch.Generator().manual_seed(0))
    kernel = torch.compile(ternary_candidate, dynamic=True, fullgraph=True)
    ways = {"eager": partial(quantizers.ternary_at, delta=0.3), "compiled": partial(kernel, delta=torch.tensor(0.3))}
    rows = []
    for between, work in [("nothing", None), ("the 3×3 conv 16→16 on Q's output", conv)]:
        times: dict[str, list[float]] = {k: [] for k in ways}
        for i in range(repeats + 1):
            for k, q in ways.items():
                x = torch.nn.functional.hardtanh(x0 * 1.01)
                t = time.perf_counter()
                out = q(x)
                if i:  # the first round warms up (and compiles)
                    times[k].append(time.perf_counter() - t)
                if work is not None:
                    work(out)
        rows.append((between, *(statistics.median(times[k]) * 1e6 for k in ways)))
    return rows


def ways(x, g) -> dict[str, tuple]:
    """{name: (eager call, compiled call)} for the three smooth pseudo-gradients, scheduled ones at 50 %."""
    est = {name: estimators.create_estimator(name, bits=2, role="activation")
           for name in ("reste", "ede", "approx_sign")}
    for e in est.values():
        e.set_progress(50, 100)
    ede = est["ede"]
    fused = {"reste": partial(est["reste"].pseudo_grad, x, g),  # the package's compiled path (MODE on)
             "ede": partial(compiled.run, ede_candidate, x, g, -2 * ede.t, 4 * ede.k * ede.t),
             "approx_sign": partial(compiled.run, approx_sign_candidate, x, g)}
    return {name: (partial(e.pseudo_grad, x, g), fused[name]) for name, e in est.items()}


def timed(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each call, interleaved in a shuffled order each round (mode set per call)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    keys, rng = list(calls), random.Random(0)
    for mode, f in calls.values():
        compiled.MODE = mode
        f()
    for _ in range(repeats):
        rng.shuffle(keys)
        for k in keys:
            mode, f = calls[k]
            compiled.MODE = mode
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


FIRST_COMPILE = """
import time, torch
from estimators import compiled
from estimators.ede import _reste_grad
compiled.MODE = "on"
torch.set_grad_enabled(False)
x = torch.randn(1 << 16)
t0 = time.perf_counter()
compiled.run(_reste_grad, x, x, -0.4, 0.6, 0.1, 1.5)
t1 = time.perf_counter()
compiled.run(lambda a, b: (a * b).abs(), x, x)
print(t1 - t0, time.perf_counter() - t1)
"""


EPOCH = """
import sys, time, torch
from estimators import compiled
from workers.datasets import load_dataset
from workers.malloc import keep_freed_memory
from workers.models import create_model
from workers.spec import Optimizer
from workers.train import build_optimizer, train_epoch
torch.set_num_threads(int(sys.argv[1]))
keep_freed_memory()
n = int(sys.argv[2])
data = load_dataset("synthetic", shape=(3, 32, 32), n_train=n, n_val=0, n_test=1)
batches = [(data.train_x[i:i + 64], data.train_y[i:i + 64]) for i in range(0, n, 64)]
torch.manual_seed(0)
model = create_model("resnet20", num_classes=data.num_classes, input_shape=data.input_shape, w_bits=2, a_bits=2,
                     estimator="reste")
import estimators
estimators.set_progress(model, 50, 100)
opt = build_optimizer(model.parameters(), Optimizer())
t0 = time.perf_counter()
train_epoch(model, opt, batches)
print(time.perf_counter() - t0, bool(compiled._kernels))
"""


def epochs(threads: int, images: int) -> list[tuple[str, float, bool]]:
    """(label, wall seconds, compiled?) of one epoch in a fresh process: off, auto cold, auto warm."""
    root = str(Path(__file__).resolve().parents[1])
    out = []
    with tempfile.TemporaryDirectory() as cache:
        for label, mode in [("off", "off"), ("auto, empty cache", "auto"), ("auto, warm cache", "auto")]:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": root, "BITBENCH_COMPILE": mode}
            seconds, hot = subprocess.run([sys.executable, "-c", EPOCH, str(threads), str(images)], env=env,
                                          capture_output=True, text=True, check=True).stdout.split()
            out.append((label, float(seconds), hot == "True"))
    return out


def first_compiles() -> list[tuple[float, float]]:
    """(first formula, a second formula) compile seconds in a fresh process: cold cache, then warm."""
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": root}
        runs = [subprocess.run([sys.executable, "-c", FIRST_COMPILE], env=env, capture_output=True, text=True,
                               check=True).stdout.split() for _ in range(2)]
    return [(float(a), float(b)) for a, b in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--epoch-images", type=int, default=0, help="also time one resnet20 epoch of this many images")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)  # as inside a backward
    keep_freed_memory()  # as training does (workers.malloc): no page faults on each fresh buffer
    print(f"`python bench/compiled.py {' '.join(sys.argv[1:])}` — torch {torch.__version__}, {args.threads} "
          f"thread(s), medians of {args.repeats} interleaved calls, load average {os.getloadavg()[0]:.1f}\n")
    print("| pseudo-gradient | activation | eager ms per Mi | compiled ms per Mi | saved ms per Mi | × eager |")
    print("|---|---|---:|---:|---:|---:|")
    for shape in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x, g = torch.randn(shape, generator=gen) * 0.7, torch.randn(shape, generator=gen)
        mib = x.numel() / (1 << 20)
        calls = {}
        for name, (eager, fused) in ways(x, g).items():
            calls[name, "eager"] = ("off", eager)
            calls[name, "compiled"] = ("on", fused)
        med = timed(calls, args.repeats)
        for name in ("reste", "ede", "approx_sign"):
            e, c = med[name, "eager"] * 1e3 / mib, med[name, "compiled"] * 1e3 / mib
            print(f"| {name} | {'×'.join(map(str, shape))} | {e:.3f} | {c:.3f} | {e - c:.3f} | {e / c:.2f} |")
    print("\nthe ternary Q on a HardTanh output of 64×16×32×32, µs per call:\n")
    print("| between calls | eager (hardshrink, sign) | compiled (one loop) | × eager |")
    print("|---|---:|---:|---:|")
    for between, e, c in in_context(args.repeats):
        print(f"| {between} | {e:.0f} | {c:.0f} | {e / c:.2f} |")
    (cold, cold2), (warm, warm2) = first_compiles()
    print(f"\nfirst compile of a process: {cold:.1f} s with an empty Inductor cache, {warm:.1f} s with a warm one; "
          f"a further formula in the same process: {cold2:.2f} s cold, {warm2:.2f} s warm")
    if args.epoch_images:
        print(f"\none epoch of {args.epoch_images:,} images, resnet20 W2A2, ReSTE, batch 64, fresh processes:\n")
        print("| BITBENCH_COMPILE | wall s | × off | compiled during the epoch |")
        print("|---|---:|---:|---|")
        rows = epochs(args.threads, args.epoch_images)
        for label, seconds, hot in rows:
            print(f"| {label} | {seconds:.1f} | {seconds / rows[0][1]:.3f} | {'yes' if hot else 'no'} |")


if __name__ == "__main__":
    main()

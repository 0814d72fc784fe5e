"""ReSTE's power |x|^p on the CPU, three ways: ATen's ``pow``, ``exp2(p·log2 x)``, and ``torch.compile`` of the pow.

    python bench/power.py [--numel 1048576] [--progress 50] [--repeats 31] [--threads 1]

ReSTE's pseudo-gradient needs max(|x|, ε)^((1−o)/o) of every activation (``estimators/ede.py``). This times
each way on the same float32 tensor (|x| in [ε, 1.5], o at ``--progress`` % of training with the default
o_end = 3), medians of interleaved calls, and gives each way's largest error relative to the float64 power,
in float32 epsilons. The compiled one's first call (the compile) is timed on its own.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def power(a: torch.Tensor, p: float) -> torch.Tensor:
    return a.pow(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--progress", type=float, default=50.0, help="percent of training (ReSTE's o schedule)")
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    o = 1 + 2 * (1 - math.cos(math.pi / 2 * args.progress / 100))
    p = (1 - o) / o
    a = (torch.rand(args.numel, generator=torch.Generator().manual_seed(0)) * 1.5).clamp_min(0.1)
    start = time.perf_counter()
    compiled = torch.compile(power, dynamic=False)
    compiled(a, p)
    compile_s = time.perf_counter() - start
    ways = {"ATen pow": lambda: a.pow(p), "exp2(p·log2 x)": lambda: a.log2().mul_(p).exp2_(),
            "torch.compile(pow)": lambda: compiled(a, p)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    keys, order = list(ways), random.Random(0)
    for f in ways.values():
        f()
    for _ in range(args.repeats):
        order.shuffle(keys)
        for k in keys:
            t = time.perf_counter()
            ways[k]()
            times[k].append(time.perf_counter() - t)
    exact = a.double().pow(p)
    eps = torch.finfo(torch.float32).eps
    mib = args.numel / (1 << 20)
    print(f"`python bench/power.py {' '.join(sys.argv[1:])}` — torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.numel:,} float32, o = {o:.4f} (p = {p:.4f}), load average {os.getloadavg()[0]:.1f}\n")
    print("| way | ms per Mi elements | × ATen pow | largest relative error, ε |")
    print("|---|---:|---:|---:|")
    ref = statistics.median(times["ATen pow"])
    for k, f in ways.items():
        med = statistics.median(times[k])
        err = ((f().double() - exact).abs() / exact).max().item() / eps
        print(f"| {k} | {med * 1e3 / mib:.2f} | {ref / med:.2f} | {err:.2f} |")
    print(f"\ntorch.compile's first call (the compile): {compile_s:.1f} s")


if __name__ == "__main__":
    main()

"""Estimator cost on the CPU: forward + backward of every estimator, and a W1A1 QConv2d step.

    python bench/estimators.py [--numel 4194304] [--repeats 15] [--markdown]

Every number is a median over interleaved repeats measured in this one run, so ratios compare
like with like. A training step is forward + backward (input and weight gradients) of one conv.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import estimators as E  # noqa: E402


def median_ms(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Time each callable ``repeats`` times, interleaved (round robin), median in ms."""
    for fn in fns.values():  # warm up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def fwd_bwd(module, x, g):
    def run():
        xx = x.detach().requires_grad_(True)
        module(xx).backward(g)

    return run


def bench_estimators(numel: int, repeats: int) -> list[tuple[str, float, float]]:
    """(name, ms, ratio to a plain hardtanh forward+backward) for every estimator at 1 bit."""
    torch.manual_seed(0)
    x = torch.randn(numel)
    g = torch.randn(numel)
    fns = {"hardtanh (reference)": fwd_bwd(nn.Hardtanh(), x, g)}
    for name in E.list_estimators():
        fns[name] = fwd_bwd(E.create_estimator(name, bits=1, role="activation"), x, g)
    ms = median_ms(fns, repeats)
    ref = ms["hardtanh (reference)"]
    return [(k, v, v / ref) for k, v in ms.items()]


class NaiveSign(torch.autograd.Function):
    """The textbook clipped-STE sign: where(x ≥ 0, 1, −1) forward, g·1[|x| ≤ 1] backward (a baseline)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= 1).float()


class NaiveConv(nn.Conv2d):
    """W1A1 conv quantizing input and weight with :class:`NaiveSign`."""

    def forward(self, x):
        return self._conv_forward(NaiveSign.apply(x), NaiveSign.apply(self.weight), None)


def conv_step(layer, x, g):
    def run():
        xx = x.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        layer(xx).backward(g)

    return run


def bench_conv(batch: int, channels: int, size: int, repeats: int) -> list[tuple[str, float, float]]:
    """Training step of W1A1 QConv2d (ste, aqe, clipped_ste) against nn.Conv2d of the same shape."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).clamp(-1, 1)
    g = torch.randn(batch, channels, size, size)
    fns = {"nn.Conv2d (float)": conv_step(nn.Conv2d(channels, channels, 3, padding=1, bias=False), x, g)}
    fns["naive autograd sign (baseline)"] = conv_step(NaiveConv(channels, channels, 3, padding=1, bias=False), x, g)
    for name in ("ste", "aqe", "clipped_ste"):
        layer = E.QConv2d(channels, channels, 3, padding=1, w_bits=1, a_bits=1, estimator=name)
        fns[f"QConv2d W1A1 {name}"] = conv_step(layer, x, g)
    ms = median_ms(fns, repeats)
    ref = ms["nn.Conv2d (float)"]
    return [(k, v, v / ref) for k, v in ms.items()]


def table(rows, title: str) -> str:
    lines = [f"| {title} | ms (median) | × reference |", "|---|---:|---:|"]
    lines += [f"| {k} | {ms:.2f} | {r:.2f} |" for k, ms, r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=4 * 2**20)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=16)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    print(table(bench_estimators(a.numel, a.repeats), f"estimator, fwd+bwd on {a.numel:,} elements (1 bit)"))
    print()
    shape = f"{a.batch}×{a.channels}×{a.size}×{a.size}, 3×3, {a.channels}→{a.channels}"
    print(table(bench_conv(a.batch, a.channels, a.size, a.repeats), f"conv training step, {shape}"))


if __name__ == "__main__":
    main()

"""Estimator cost on the CPU: forward + backward of every estimator, a W1A1 QConv2d step, and a
conv-block training step at W1A1, W2A2 and W3A3.

    python bench/estimators.py [--sections tensor,conv,block] [--only lsq,dsq] [--bits 1,2,3]
                               [--numel 4194304] [--repeats 15] [--block-repeats 25] [--threads 2]
                               [--baseline DIR] [--all-threads] [--default-malloc] [--clock wall|cpu]
                               [--order conv-first|hardtanh-first]

Every number is a median over interleaved repeats measured in this one run, so ratios compare
like with like. The conv step is forward + backward (input and weight gradients) of one conv; the
block step is conv 3×3 → BatchNorm → HardTanh, forward, backward (input, weights, BN and the
estimators' learnable parameters) and an SGD step with momentum, against the same block in float;
a second float block ("float (control)") shows how far two identical rows drift apart in the run.
``--baseline DIR`` adds every block row again with the ``estimators`` package found in DIR (e.g. an
older commit: ``git archive COMMIT estimators | tar -x -C DIR``), loaded side by side in this
process, so before and after are measured in the same run; ``--all-threads`` adds them again with
the fused estimators' one-thread rule off (``estimators.fused_ops.one_thread``). glibc keeps freed
memory for reuse, as training does (``workers.malloc``), unless ``--default-malloc``. ``--clock
cpu`` times CPU seconds of the process instead of wall time: steadier on a loaded machine at one
thread, where the CPU time a step takes does not count the time it waits for a core (the numbers
to publish are wall time). ``--order hardtanh-first`` times the same three ops as HardTanh → conv → BN, so
the quantizer's input is a HardTanh output in the autograd graph, as in a network (what
``estimators.minw.from_hardtanh`` reads); the default is issue 16's block, whose input is a leaf tensor.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import estimators as E  # noqa: E402
from estimators import fused_ops  # noqa: E402
from workers.malloc import keep_freed_memory  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def median_ms(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Time each callable ``repeats`` times, interleaved (every callable once per round, in an order
    shuffled each round so that no row always follows the same one), median in ms."""
    for fn in fns.values():  # warm up
        fn()
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            fn = fns[k]
            t = clock()
            fn()
            times[k].append((clock() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def fwd_bwd(module, x, g):
    def run():
        xx = x.detach().requires_grad_(True)
        module(xx).backward(g)

    return run


def bench_estimators(numel: int, repeats: int, names: list[str]) -> list[tuple[str, float, float]]:
    """(name, ms, ratio to a plain hardtanh forward+backward) for every estimator at 1 bit."""
    torch.manual_seed(0)
    x = torch.randn(numel)
    g = torch.randn(numel)
    fns = {"hardtanh (reference)": fwd_bwd(nn.Hardtanh(), x, g)}
    for name in names:
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


def bench_conv(batch: int, channels: int, size: int, repeats: int, names: list[str]) -> list[tuple[str, float, float]]:
    """Training step of W1A1 QConv2d (``names``) against nn.Conv2d of the same shape."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size).clamp(-1, 1)
    g = torch.randn(batch, channels, size, size)
    fns = {"nn.Conv2d (float)": conv_step(nn.Conv2d(channels, channels, 3, padding=1, bias=False), x, g)}
    fns["naive autograd sign (baseline)"] = conv_step(NaiveConv(channels, channels, 3, padding=1, bias=False), x, g)
    for name in names:
        layer = E.QConv2d(channels, channels, 3, padding=1, w_bits=1, a_bits=1, estimator=name)
        fns[f"QConv2d W1A1 {name}"] = conv_step(layer, x, g)
    ms = median_ms(fns, repeats)
    ref = ms["nn.Conv2d (float)"]
    return [(k, v, v / ref) for k, v in ms.items()]


def load_estimators(directory: str, alias: str = "estimators_baseline"):
    """The ``estimators`` package in ``directory``, imported under ``alias`` (beside this one)."""
    root = Path(directory) / "estimators"
    spec = importlib.util.spec_from_file_location(alias, root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"no estimators package in {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def conv_block(channels: int, estimator: str | None, bits: int, package=E, order: str = "conv-first") -> nn.Sequential:
    """conv 3×3 (no bias) → BatchNorm → HardTanh, or with ``order`` "hardtanh-first" HardTanh → conv → BatchNorm
    (the same ops; the conv's input quantizer then sees a HardTanh output in the graph, as in a network);
    float when ``estimator`` is None."""
    conv = (nn.Conv2d(channels, channels, 3, padding=1, bias=False) if estimator is None else
            package.QConv2d(channels, channels, 3, padding=1, w_bits=bits, a_bits=bits, estimator=estimator))
    if order == "hardtanh-first":
        return nn.Sequential(nn.Hardtanh(), conv, nn.BatchNorm2d(channels))
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.Hardtanh())


def block_step(block: nn.Module, x: torch.Tensor, g: torch.Tensor, serial_numel: int | None = None):
    """One training step: forward, backward (input and every parameter), SGD with momentum; with
    ``serial_numel`` set, the fused estimators' one-thread limit is that during the step."""
    opt = torch.optim.SGD(block.parameters(), lr=1e-3, momentum=0.9)

    def run():
        saved = fused_ops.SERIAL_NUMEL
        if serial_numel is not None:
            fused_ops.SERIAL_NUMEL = serial_numel
        try:
            xx = x.detach().requires_grad_(True)
            opt.zero_grad(set_to_none=True)
            block(xx).backward(g)
            opt.step()
        finally:
            fused_ops.SERIAL_NUMEL = saved

    return run


def bench_block(batch: int, channels: int, size: int, repeats: int, names: list[str],
                bits: list[int], baseline=None, parallel: bool = False,
                order: str = "conv-first") -> list[tuple[str, float, float]]:
    """Training step of the conv block (:func:`conv_block` in ``order``) for every estimator at WbAb (b in
    ``bits``) against float, with the ``baseline`` package's estimators (rows "NAME (baseline)") when given,
    and with every intra-op thread for the fused estimators (rows "NAME (all threads)") when ``parallel``."""
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)  # hardtanh-first: a BatchNorm output, as inside a network
    if order == "conv-first":
        x = x.clamp(-1, 1)  # the values of a HardTanh output, as inside a network (a leaf here, not its graph)
    g = torch.randn(batch, channels, size, size)
    fns = {"float": block_step(conv_block(channels, None, 32, order=order), x, g),
           "float (control)": block_step(conv_block(channels, None, 32, order=order), x, g)}  # the same: the noise
    for name in names:
        variants = [(name, E, None)]
        if parallel:
            variants.append((f"{name} (all threads)", E, 0))
        if baseline:
            variants.append((f"{name} (baseline)", baseline, None))
        for label, package, serial_numel in variants:
            for b in bits:
                fns[f"{label} W{b}A{b}"] = block_step(conv_block(channels, name, b, package, order), x, g,
                                                      serial_numel)
    ms = median_ms(fns, repeats)
    ref = ms["float"]
    return [(k, v, v / ref) for k, v in ms.items()]


def block_table(rows, bits: list[int], title: str) -> str:
    """One row per estimator, ms and × float per bit width."""
    by = {k: (ms, r) for k, ms, r in rows}
    head = " | ".join(f"W{b}A{b} ms | W{b}A{b} ×float" for b in bits)
    lines = [f"| {title} | {head} |", "|---|" + "---:|---:|" * len(bits)]
    f_ms = by["float"][0]
    lines.append("| float | " + " | ".join(f"{f_ms:.1f} | 1.00" for _ in bits) + " |")
    c_ms, c_r = by["float (control)"][:2]
    lines.append("| float (control) | " + " | ".join(f"{c_ms:.1f} | {c_r:.2f}" for _ in bits) + " |")
    names = dict.fromkeys(k.rsplit(" ", 1)[0] for k in by if not k.startswith("float"))
    for n in names:
        cells = []
        for b in bits:
            ms, r = by[f"{n} W{b}A{b}"]
            cells.append(f"{ms:.1f} | {r:.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    ap.add_argument("--block-repeats", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", default="tensor,conv,block", help="comma-separated: tensor, conv, block")
    ap.add_argument("--only", default="", help="comma-separated estimator names (default: all)")
    ap.add_argument("--bits", default="1,2,3", help="bit widths of the block section, comma-separated")
    ap.add_argument("--baseline", metavar="DIR", help="also time the block with the estimators package in DIR")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc settings as they are")
    ap.add_argument("--all-threads", action="store_true",
                    help="also time every fused estimator without its one-thread rule (fused_ops.one_thread)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or the process's CPU time")
    ap.add_argument("--order", choices=("conv-first", "hardtanh-first"), default="conv-first",
                    help="the block's ops: conv, BN, HardTanh (issue 16's block) or HardTanh, conv, BN (the "
                         "quantizer's input a HardTanh output in the graph, as in a network)")
    a = ap.parse_args()
    global clock
    clock = CLOCKS[a.clock]
    torch.set_num_threads(a.threads)
    malloc = "glibc defaults" if a.default_malloc else f"freed memory kept: {keep_freed_memory()}"
    baseline = load_estimators(a.baseline) if a.baseline else None
    sections = set(a.sections.split(","))
    if sections - {"tensor", "conv", "block"}:
        ap.error(f"unknown section(s): {', '.join(sorted(sections - {'tensor', 'conv', 'block'}))}")
    names = [n.strip() for n in a.only.split(",") if n.strip()] or E.list_estimators()
    for n in names:
        E.get_estimator_class(n)  # an unknown name fails here, listing the known ones
    bits = [int(b) for b in a.bits.split(",")]
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, {a.clock} clock, malloc: {malloc}, "
          f"load average {load_average()} at the start\n")
    shape = f"{a.batch}×{a.channels}×{a.size}×{a.size}, 3×3, {a.channels}→{a.channels}"
    if "tensor" in sections:
        print(table(bench_estimators(a.numel, a.repeats, names), f"estimator, fwd+bwd on {a.numel:,} elements (1 bit)"))
        print()
    if "conv" in sections:
        conv_names = [n for n in ("ste", "aqe", "clipped_ste") if n in names]
        print(table(bench_conv(a.batch, a.channels, a.size, a.repeats, conv_names), f"conv training step, {shape}"))
        print()
    if "block" in sections:
        rows = bench_block(a.batch, a.channels, a.size, a.block_repeats, names, bits, baseline, a.all_threads,
                           a.order)
        ops = "conv+BN+HardTanh" if a.order == "conv-first" else "HardTanh+conv+BN"
        print(block_table(rows, bits, f"{ops} step, SGD momentum, {shape}"))
    print(f"\nload average {load_average()} at the end")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (a shared machine's other work shows here)."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()

"""Packed numpy engine vs torch's float eval of the same low-bit model, on the CPU.

    python bench/packed.py [--models digits_net convnet_d] [--bits 1/1 2/2 3/3] [--batch 256]
                           [--threads 1 2] [--repeats 7] [--micro-batch 64]

Throughput: images/s on one batch, median over interleaved repeats (engine and torch in turn,
same process, same thread count: ``torch.set_num_threads(t)`` and the engine's ``threads=t``).
Memory, each measured in a fresh child process so that neither pollutes the other:
weights = bytes held for the weights (engine: packed planes as loaded + the float32 first
layer; torch: parameters + buffers); working set = peak RSS during two forward passes minus the
RSS before them, in a process that only loaded the model (file / state_dict), the input and the
libraries. The engine's numpy peak from tracemalloc is reported as a cross-check.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from workers.models import create_model  # noqa: E402
from workers.packed import PackedNet, export_model  # noqa: E402

SHAPES = {"digits_net": (1, 8, 8), "fashion_net": (1, 28, 28)}


def build(name: str, w_bits: int, a_bits: int, path: str):
    """An eval-mode model (seeded, BN statistics made non-trivial) and its packed file."""
    torch.manual_seed(0)
    shape = SHAPES.get(name, (3, 32, 32))
    model = create_model(name, num_classes=10, input_shape=shape, w_bits=w_bits, a_bits=a_bits, estimator="aqe")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 2)
                m.running_var.uniform_(1, 10)
    model.eval()
    report = export_model(model, path, input_shape=shape)
    return model, report, shape


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call, calls interleaved round robin after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def engine_weight_bytes(net: PackedNet) -> int:
    total = 0
    for layer in net.layers:
        if layer.float_in:
            total += layer.wf.nbytes
            continue
        w = layer.w
        total += w.neg.nbytes + sum(p.nbytes for _, p in w.masks or [])
    return total


def child(args) -> None:
    """Measure one side's memory in this fresh process (it only loads the saved artifacts)."""
    shape = SHAPES.get(args.child_model, (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
    torch.set_num_threads(args.child_threads)
    if args.child_side == "engine":
        net = PackedNet.load(f"{args.child_dir}/m.bbpack", threads=args.child_threads, micro_batch=args.micro_batch)
        weights, run = engine_weight_bytes(net), lambda: net.logits(x, batch_size=args.batch)
    else:
        model = create_model(args.child_model, num_classes=10, input_shape=shape, w_bits=args.child_w,
                             a_bits=args.child_a, estimator="aqe")
        model.load_state_dict(torch.load(f"{args.child_dir}/m.pt"))
        model.eval()
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        xt = torch.from_numpy(x)

        def run():
            with torch.no_grad():
                model(xt)
    before = rss_bytes()
    run()
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    traced = None
    if args.child_side == "engine":
        tracemalloc.start()
        run()
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(json.dumps({"weights": weights, "working": max(0, peak - before), "traced": traced}))


def memory(model: str, w: int, a: int, side: str, folder: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child-side", side, "--child-model", model, "--child-w", str(w),
           "--child-a", str(a), "--child-threads", str(min(args.threads)), "--child-dir", folder,
           "--batch", str(args.batch)]
    cmd += ["--micro-batch", str(args.micro_batch)] if args.micro_batch else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits_net", "convnet_d"])
    p.add_argument("--bits", nargs="+", default=["1/1"], help="w/a pairs, e.g. 1/1 2/2 3/3")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--micro-batch", type=int, default=None, help="engine rows per pass (default: the engine's)")
    p.add_argument("--no-memory", action="store_true")
    for a in ("side", "model", "dir"):
        p.add_argument(f"--child-{a}", help=argparse.SUPPRESS)
    for a in ("w", "a", "threads"):
        p.add_argument(f"--child-{a}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_side:
        return child(args)

    command = " ".join(["python", "bench/packed.py", *sys.argv[1:]])
    print(f"`{command}` — {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, numpy {np.__version__}, batch {args.batch}\n")
    print("| model | W/A | threads | packed img/s | torch img/s | packed / torch | packed weights MiB | "
          "torch weights MiB | packed working set MiB (numpy peak) | torch working set MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for bits in args.bits:
            w, a = (int(v) for v in bits.split("/"))
            with tempfile.TemporaryDirectory() as d:
                model, report, shape = build(name, w, a, f"{d}/m.bbpack")
                torch.save(model.state_dict(), f"{d}/m.pt")
                x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
                xt = torch.from_numpy(x)
                mem = {} if args.no_memory else {s: memory(name, w, a, s, d, args) for s in ("engine", "torch")}
                for t in args.threads:
                    torch.set_num_threads(t)
                    net = PackedNet.load(f"{d}/m.bbpack", threads=t, micro_batch=args.micro_batch)
                    with torch.no_grad():
                        agree = (net.predict(x, args.batch) == model(xt).argmax(1).numpy()).mean()
                        s = timed({"engine": lambda: net.logits(x, batch_size=args.batch),
                                   "torch": lambda: model(xt)}, args.repeats)
                    net.close()
                    e, tt = args.batch / s["engine"], args.batch / s["torch"]
                    me, mt = mem.get("engine", {}), mem.get("torch", {})
                    print(f"| {name} | W{w}A{a} | {t} | {e:,.0f} | {tt:,.0f} | {e / tt:.2f}× | "
                          f"{mib(me.get('weights'))} | {mib(mt.get('weights'))} | "
                          f"{mib(me.get('working'))} ({mib(me.get('traced'))}) | {mib(mt.get('working'))} |"
                          + ("" if agree == 1 else f" agreement {agree:.4f}"))
    print(f"\nMemory columns use {min(args.threads)} thread(s); packed file payload = packed weight planes "
          "(+ float32 first layer where the model has float input weights).")


if __name__ == "__main__":
    main()

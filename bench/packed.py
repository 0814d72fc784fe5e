"""Packed engine (compiled numba kernels and the numpy fallback) vs torch's float eval of the same low-bit model.

    python bench/packed.py [--models digits_net convnet_d] [--bits 1/1 2/2 3/3] [--batch 256]
                           [--threads 1 2] [--repeats 15] [--micro-batch 64] [--no-memory] [--no-compile]
                           [--backends numba numpy] [--unfolded] [--baseline DIR]

Models use ``act_stats=running`` (estimated with ``estimators.calibrate_activation_stats`` on one random
batch), so ternary / pow2 inputs have a constant statistic and are folded into integer steps. ``--unfolded``
adds a column: the first backend on the same model exported with ``fold_levels=False`` (float32 BN and
run-time quantizers, the layout before the level folds), in the same interleaving, and a table of what
follows each folded accumulator alone (the steps kernel vs float32 BN + the run-time quantizer).

Throughput: images/s on one batch, median over interleaved repeats (numba engine, numpy engine and
torch in turn, each a block of calls whose first is not counted (``timed``), same process, same thread
count: ``torch.set_num_threads(t)`` and the engine's ``threads=t``). Wall clock, and for one thread also
the calling thread's CPU time (``time.thread_time``: on a machine shared with other jobs it leaves out
the time the thread waited for a core; all three run in the calling thread at one thread). Agreement: the numba
engine's predictions = torch's; "numba = numpy": their logits are bit-identical.
Latency: one image, one thread, median over the same interleaving.
Memory, each measured in a fresh child process so that neither pollutes the other: weights = bytes
held for the weights (engine: packed planes as loaded + the float32 first layer; torch: parameters +
buffers); working set = peak RSS during two forward passes minus the RSS before them, after one
warm-up pass (compiled kernels loaded; the peak is reset with /proc/self/clear_refs).
Layers alone (numba): each binary conv of convnet_d W1A1 (torch's ``F.conv2d`` vs the packed XNOR conv) and,
with ``--baseline DIR`` (another commit's ``workers/packed``, e.g. ``git archive REV workers/packed | tar -x -C DIR``),
each SHIFT GEMM of convnet_d W3A3 with this commit's kernel and with that one.
Compile: in fresh child processes with an empty numba cache: the first ``logits`` call (JIT compile)
and the same call in a second process that finds the cache (``cache=True``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from functools import partial
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import estimators  # noqa: E402
from workers.models import create_model  # noqa: E402
from workers.packed import PackedNet, export_model  # noqa: E402
from workers.packed.kernels import BACKENDS  # noqa: E402

SHAPES = {"digits_net": (1, 8, 8), "fashion_net": (1, 28, 28)}


def build(name: str, w_bits: int, a_bits: int, path: str, unfolded: str | None = None):
    """An eval-mode model (seeded, BN statistics made non-trivial, running activation statistics estimated on one
    random batch) and its packed file (and, given ``unfolded``, the file without level folds there)."""
    torch.manual_seed(0)
    shape = SHAPES.get(name, (3, 32, 32))
    model = create_model(name, num_classes=10, input_shape=shape, w_bits=w_bits, a_bits=a_bits, estimator="aqe")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 2)
                m.running_var.uniform_(1, 10)
    estimators.calibrate_activation_stats(model, [torch.randn(64, *shape)])
    report = export_model(model, path, input_shape=shape)
    if unfolded:
        export_model(model, unfolded, input_shape=shape, fold_levels=False)
    return model, report, shape


def timed(fns: dict, repeats: int, block: int = 3) -> dict[str, tuple[float, float]]:
    """(median wall s, median thread-CPU s) per call, calls interleaved after one warm-up each: every repeat
    runs each side's block of ``block`` consecutive calls in a fresh seeded random order, and the first call
    of a block is not counted. That call absorbs what the other side left behind: cold caches (~0.1 ms at
    one image) and, with several threads, torch's OpenMP threads still spinning after its call, which took
    a core from whatever ran next (the engine at 2 threads on digits_net: 19k img/s right after torch,
    31k in a block of its own)."""
    for f in fns.values():
        f()
    times = {k: ([], []) for k in fns}
    keys, order = list(fns), random.Random(0)
    for _ in range(repeats):
        order.shuffle(keys)
        for k in keys:
            f = fns[k]
            for i in range(block):
                t, c = time.perf_counter(), time.thread_time()
                f()
                if i or block == 1:
                    times[k][1].append(time.thread_time() - c)
                    times[k][0].append(time.perf_counter() - t)
    return {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in times.items()}


def calls(nets: dict, model, x: np.ndarray, xt: torch.Tensor) -> dict:
    """One forward pass of each engine and of torch on the batch x (numpy) / xt (the same, torch)."""
    return {**{b: (lambda net=net: net.logits(x, batch_size=len(x))) for b, net in nets.items()},
            "torch": lambda: model(xt)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Start the peak RSS (VmHWM) afresh from the current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def engine_weight_bytes(net: PackedNet) -> int:
    total = 0
    for layer in net.layers:
        if layer.float_in:
            total += layer.wf.nbytes
            continue
        w = layer.w
        total += w.neg.nbytes + w.stack.nbytes
    return total


def child(args) -> None:
    """Measure one side's memory (or the engine's first calls) in this fresh process."""
    shape = SHAPES.get(args.child_model, (3, 32, 32))
    x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
    torch.set_num_threads(args.child_threads)
    if args.child_side == "compile":
        t0 = time.perf_counter()
        net = PackedNet.load(f"{args.child_dir}/m.bbpack", threads=args.child_threads, backend="numba")
        t1 = time.perf_counter()
        net.logits(x)
        t2 = time.perf_counter()
        net.logits(x)
        t3 = time.perf_counter()
        print(json.dumps({"load": t1 - t0, "first": t2 - t1, "second": t3 - t2}))
        return
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
    run()  # warm-up: compiled kernels loaded, allocators primed
    reset_peak_rss()
    before = rss_bytes()
    run()
    run()
    peak = peak_rss_bytes()
    traced = None
    if args.child_side == "engine":
        tracemalloc.start()
        run()
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(json.dumps({"weights": weights, "working": max(0, peak - before), "traced": traced}))


def run_child(model: str, w: int, a: int, side: str, folder: str, args, env=None) -> dict:
    cmd = [sys.executable, __file__, "--child-side", side, "--child-model", model, "--child-w", str(w),
           "--child-a", str(a), "--child-threads", str(min(args.threads)), "--child-dir", folder,
           "--batch", str(args.batch)]
    cmd += ["--micro-batch", str(args.micro_batch)] if args.micro_batch else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def mib(b) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"


def binary_convs(args) -> None:
    """Each binary conv of convnet_d W1A1 alone, one thread, the engine's micro-batch of images: torch's
    float32 ``F.conv2d`` on ±1 inputs and ±1 weights vs the engine's packed im2col + XNOR GEMM (+ the
    zero-padding correction) on the same inputs — the per-layer speed-up LCE reports."""
    import torch.nn.functional as F

    from workers.packed.format import unpack_bits

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        model, _, shape = build("convnet_d", 1, 1, f"{d}/m.bbpack")
        net = PackedNet.load(f"{d}/m.bbpack", threads=1, backend="numba")
        n = net.micro_batch
        act = np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32).transpose(0, 2, 3, 1)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        print(f"\nBinary conv layers alone (convnet_d W1A1, batch {n}, 1 thread; median ms, CPU clock):\n")
        print("| layer | input | K × out | torch F.conv2d ms | packed XNOR conv ms | torch / packed |")
        print("|---|---|---|---|---|---|")
        for layer, conv in zip(net.layers, convs, strict=False):
            if layer.conv and not layer.float_in:
                op = layer._quantized(act) if isinstance(act, np.ndarray) else act  # packed ±1 input
                x = torch.from_numpy(np.where(unpack_bits(op.neg, op.bits), -1.0, 1.0).astype(np.float32))
                x = x.permute(0, 3, 1, 2).contiguous()
                with torch.no_grad():
                    w = conv.quantized_weight().detach().contiguous()
                    s = timed({"torch": lambda x=x, w=w, c=conv: F.conv2d(x, w, None, c.stride, c.padding),
                               "packed": lambda op=op, layer=layer: layer._int_acc(op)}, 4 * args.repeats)
                rec = layer.rec
                ms = {k: v[1] * 1e3 for k, v in s.items()}
                print(f"| {rec.name} | {'×'.join(map(str, op.neg.shape[1:3]))}×{op.bits} | {rec.K} × {rec.out} | "
                      f"{ms['torch']:.2f} | {ms['packed']:.2f} | {ms['torch'] / ms['packed']:.1f}× |")
            act = layer(act)
        net.close()


def baseline_jit(folder: str):
    """``workers/packed/jit.py`` of another commit (``git archive REV workers/packed | tar -x -C folder``),
    imported beside this one as its own module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_jit", Path(folder) / "workers/packed/jit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's cache finds the kernels' module by name
    spec.loader.exec_module(module)
    return module


def shift_gemms(args) -> None:
    """The SHIFT GEMM of each powers-of-two conv of convnet_d W3A3 alone, one thread, the engine's micro-batch
    (same packed rows, same weights, same output): this commit's ``planes_gemm`` vs the ``--baseline`` one."""
    from workers.packed import jit

    kernels = {"this": jit.planes_gemm, "baseline": baseline_jit(args.baseline).planes_gemm}
    torch.set_num_threads(1)
    print(f"\nSHIFT GEMMs alone (convnet_d W3A3, batch 64, 1 thread; median ms, CPU clock; "
          f"baseline {args.baseline}):\n")
    print("| layer | rows | K × out | plane pairs | baseline ms | this ms | baseline / this |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        _, _, shape = build("convnet_d", 3, 3, f"{d}/m.bbpack")
        net = PackedNet.load(f"{d}/m.bbpack", threads=1, backend="numba")
        act = np.random.default_rng(0).standard_normal((net.micro_batch, *shape)).astype(np.float32)
        act = act.transpose(0, 2, 3, 1)
        for layer in net.layers:
            if layer.conv and not layer.float_in:
                op = layer._quantized(act) if isinstance(act, np.ndarray) else act
                rows, w = net.kernels.gather(op, *layer.geom), layer.w
                am, sa = rows.stack[1:], np.array([e for e, _ in rows.masks], np.int64)
                n = len(rows.neg)
                gemm_args = (rows.neg, am, sa, w.neg, w.stack, w.shifts, w.k, np.zeros((1, w.out), np.int32))
                outs = {k: np.empty((n, w.out), np.int32) for k in kernels}
                run = {k: partial(kernels[k], *gemm_args, outs[k], 0, n) for k in kernels}
                ms = {k: v[1] * 1e3 for k, v in timed(run, 4 * args.repeats).items()}
                assert (outs["this"] == outs["baseline"]).all()
                print(f"| {layer.rec.name} | {n:,} | {w.k} × {w.out} | {len(am) * len(w.stack)} | "
                      f"{ms['baseline']:.2f} | {ms['this']:.2f} | {ms['baseline'] / ms['this']:.2f}× |")
            act = layer(act)
        net.close()


def level_folds(args) -> None:
    """What follows each hidden accumulator of convnet_d W2A2 / W3A3 (running statistics), one thread, the
    engine's micro-batch: the level fold (integer steps straight to the next input's planes) vs float32
    BN + HardTanh (+ max-pool) and the next layer's run-time quantizer (the unfolded file), same accumulator."""
    torch.set_num_threads(1)
    print("\nAfter the accumulator (convnet_d, batch 64, 1 thread; median ms, CPU clock):\n")
    print("| W/A | layer | accumulator | max-pool | folded steps ms | float32 BN + quantizer ms | unfolded / folded |")
    print("|---|---|---|---|---|---|---|")
    for w, a in [(2, 2), (3, 3)]:
        with tempfile.TemporaryDirectory() as d:
            _, _, shape = build("convnet_d", w, a, f"{d}/f.bbpack", f"{d}/u.bbpack")
            folded = PackedNet.load(f"{d}/f.bbpack", threads=1, backend="numba")
            plain = PackedNet.load(f"{d}/u.bbpack", threads=1, backend="numba")
            x = np.random.default_rng(0).standard_normal((folded.micro_batch, *shape)).astype(np.float32)
            act = x.transpose(0, 2, 3, 1)
            for i, (lf, lu) in enumerate(zip(folded.layers[:-1], plain.layers[:-1], strict=True)):
                if lf.steps is not None:
                    op = lf._quantized(act) if isinstance(act, np.ndarray) else act
                    acc, nxt = lf._int_acc(op), plain.layers[i + 1]
                    s = timed({"folded": lambda lf=lf, acc=acc: lf.kernels.steps(acc, *lf.steps, lf.rec.pool),
                               "plain": lambda lu=lu, acc=acc, nxt=nxt: nxt._quantized(lu._affine(acc.copy()))},
                              4 * args.repeats)
                    ms = {k: v[1] * 1e3 for k, v in s.items()}
                    print(f"| W{w}A{a} | {lf.rec.name} | {'×'.join(map(str, acc.shape[1:]))} | {lf.rec.pool or '–'} | "
                          f"{ms['folded']:.2f} | {ms['plain']:.2f} | {ms['plain'] / ms['folded']:.1f}× |")
                act = lf(act)
            folded.close()
            plain.close()


def compile_times(args) -> None:
    """JIT compile (empty cache) and cached first call of a W1A1 and a W3A3 digits_net, in fresh processes."""
    print("\n| model | W/A | first call, empty numba cache s (compile) | first call, cached s | second call s |")
    print("|---|---|---|---|---|")
    for w, a in [(1, 1), (3, 3)]:
        with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as cache:
            build("digits_net", w, a, f"{d}/m.bbpack")
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            cold = run_child("digits_net", w, a, "compile", d, args, env)
            warm = run_child("digits_net", w, a, "compile", d, args, env)
            print(f"| digits_net | W{w}A{a} | {cold['first']:.1f} | {warm['first']:.2f} | {warm['second']:.4f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits_net", "convnet_d"])
    p.add_argument("--bits", nargs="+", default=["1/1", "2/2", "3/3"], help="w/a pairs, e.g. 1/1 2/2 3/3")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--threads", type=int, nargs="+", default=[1, len(os.sched_getaffinity(0))])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--micro-batch", type=int, default=None, help="engine rows per pass (default: the engine's)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--backends", nargs="+", default=["numba", "numpy"])
    p.add_argument("--unfolded", action="store_true", help="add the first backend without level folds")
    p.add_argument("--baseline", help="a folder holding another commit's workers/packed: time its SHIFT GEMM beside")
    for a in ("side", "model", "dir"):
        p.add_argument(f"--child-{a}", help=argparse.SUPPRESS)
    for a in ("w", "a", "threads"):
        p.add_argument(f"--child-{a}", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_side:
        return child(args)
    args.threads = sorted(set(args.threads))
    backends = [b for b in args.backends if b in BACKENDS]
    engines = backends + ["unfolded"] * args.unfolded

    command = " ".join(["python", "bench/packed.py", *sys.argv[1:]])
    print(f"`{command}` — {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
          f"torch {torch.__version__}, numpy {np.__version__}, backends {', '.join(backends)}, batch {args.batch}, "
          f"load average {os.getloadavg()[0]:.1f} at the start\n")
    cols = " | ".join(f"{b} img/s" for b in engines + ["torch"])
    ratios = " | ".join(f"{b} / torch" for b in engines)
    folds = " folded speed-up, CPU clock |" if args.unfolded else ""
    print(f"| model | W/A | threads | {cols} | {ratios} | {backends[0]} / torch, CPU clock |{folds} agreement | "
          "engines bit-identical |")
    print("|---|---|---|" + "---|" * (2 * len(engines) + 4 + args.unfolded))
    latency, memory = [], []
    for name in args.models:
        for bits in args.bits:
            w, a = (int(v) for v in bits.split("/"))
            with tempfile.TemporaryDirectory() as d:
                model, report, shape = build(name, w, a, f"{d}/m.bbpack", f"{d}/u.bbpack" if args.unfolded else None)
                torch.save(model.state_dict(), f"{d}/m.pt")
                x = np.random.default_rng(0).standard_normal((args.batch, *shape)).astype(np.float32)
                xt = torch.from_numpy(x)
                for t in args.threads:
                    torch.set_num_threads(t)
                    nets = {b: PackedNet.load(f"{d}/m.bbpack", threads=t, micro_batch=args.micro_batch, backend=b)
                            for b in backends}
                    if args.unfolded:
                        nets["unfolded"] = PackedNet.load(f"{d}/u.bbpack", threads=t, micro_batch=args.micro_batch,
                                                          backend=backends[0])
                    with torch.no_grad():
                        ref = model(xt).numpy()
                        logits = {b: net.logits(x, args.batch) for b, net in nets.items()}
                        s = timed(calls(nets, model, x, xt), args.repeats)
                        if t == 1:
                            latency.append((name, w, a, timed(calls(nets, model, x[:1], xt[:1]), 4 * args.repeats)))
                    for net in nets.values():
                        net.close()
                    agree = (logits[backends[0]].argmax(1) == ref.argmax(1)).mean()
                    first = logits[backends[0]]
                    same = "yes" if len(logits) > 1 and all((v == first).all() for v in logits.values()) else "–"
                    rate = {k: args.batch / v[0] for k, v in s.items()}
                    cpu = f"{s['torch'][1] / s[backends[0]][1]:.2f}×" if t == 1 else "–"
                    if args.unfolded:
                        cpu += f" | {s['unfolded'][1] / s[backends[0]][1]:.2f}×" if t == 1 else " | –"
                    print(f"| {name} | W{w}A{a} | {t} | " + " | ".join(f"{rate[k]:,.0f}" for k in engines + ["torch"])
                          + " | " + " | ".join(f"{rate[b] / rate['torch']:.2f}×" for b in engines)
                          + f" | {cpu} | {agree:.4f} | {same} |", flush=True)
                if not args.no_memory and (w, a) == (1, 1):
                    sides = {side: run_child(name, w, a, side, d, args) for side in ("engine", "torch")}
                    memory.append((name, w, a, report.compression, sides))
    print(f"\nload average {os.getloadavg()[0]:.1f} after the throughput rows")

    print("\nLatency, one image, 1 thread (median ms):\n")
    print("| model | W/A | " + " | ".join(f"{b} ms" for b in engines) + f" | torch ms | torch / {backends[0]} | "
          "CPU clock |" + (" folded speed-up, CPU clock |" if args.unfolded else ""))
    print("|---|---|" + "---|" * (len(engines) + 3 + args.unfolded))
    for name, w, a, s in latency:
        print(f"| {name} | W{w}A{a} | " + " | ".join(f"{s[k][0] * 1e3:.3f}" for k in engines + ["torch"])
              + f" | {s['torch'][0] / s[backends[0]][0]:.2f}× | {s['torch'][1] / s[backends[0]][1]:.2f}× |"
              + (f" {s['unfolded'][1] / s[backends[0]][1]:.2f}× |" if args.unfolded else ""))

    if memory:
        print(f"\nMemory, {min(args.threads)} thread(s), {backends[0]} engine:\n")
        print("| model | W/A | packed weights MiB | torch weights MiB | kernels float32 / packed payload | "
              "packed working set MiB (numpy peak) | torch working set MiB |")
        print("|---|---|---|---|---|---|---|")
        for name, w, a, compression, m in memory:
            e, t = m["engine"], m["torch"]
            print(f"| {name} | W{w}A{a} | {mib(e['weights'])} | {mib(t['weights'])} | {compression:.1f}× | "
                  f"{mib(e['working'])} ({mib(e['traced'])}) | {mib(t['working'])} |")
    if "numba" in backends:
        binary_convs(args)
        if args.baseline:
            shift_gemms(args)
    if args.unfolded and "numba" in backends:
        level_folds(args)
    if not args.no_compile and "numba" in backends:
        compile_times(args)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

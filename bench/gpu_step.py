"""One GPU trial's training epoch, taken apart: what a CIFAR-10-shaped epoch costs and what would speed it up.

    python bench/gpu_step.py [--model convnet_a] [--n-train 50000] [--budget-s 300]

On synthetic CIFAR-shaped data (3×32×32, on the GPU, CIFAR-10's random crop and flip), batch 256, Adam,
``workers.train.train_epoch`` exactly as a trial runs it:

``--sections`` picks the tables:

1. **Variants** of the W1A1 ``aqe`` epoch, side by side in one process: as trained today (fp32, cuDNN's
   TF32 convolutions), channels-last memory, bf16 autocast, both, and ``torch.compile`` (first epoch,
   compile included, and later epochs). Seconds per epoch of ``--n-train`` images, median of ``--epochs``.
2. **Where a step's time goes**: CUDA kernels per step and the GPU's busy time against the wall time of
   a step (torch.profiler), for each model in ``--profile-models``: a step whose GPU is busy for far less
   than its wall time is launch-bound (Python and kernel launches), which several trials per GPU or CUDA
   graphs can fill; one whose GPU is busy throughout is not.
3. **Every bit width**: seconds per epoch of ``ste``, ``clipped_ste``, ``aqe`` at W1A1, W2A2, W3A3 and of
   the float network, each with eager steps and with the trainer's CUDA-graph steps (``workers.cuda_graphs``).

Prints markdown tables; stops starting new rows once ``--budget-s`` is spent. Exits cleanly without a
GPU unless ``--device cpu`` (a smoke test of the script on tiny sizes, not a benchmark).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from workers.cuda_graphs import graphed_forward  # noqa: E402
from workers.data.loader import DeviceLoader  # noqa: E402
from workers.data.vision import CIFAR_AUGMENT  # noqa: E402
from workers.models import trial_model  # noqa: E402
from workers.spec import parse_spec  # noqa: E402
from workers.train import build_optimizer, train_epoch  # noqa: E402


def make_trial(model: str, estimator: str | None, bits: int | None):
    """The spec's trial for ``estimator`` at W``bits``A``bits`` (``None``: the float network)."""
    spec = parse_spec({
        "name": "bench-gpu-step", "dataset": "synthetic", "model": model,
        "estimators": [estimator or "ste"], "bits": [{"w": bits or 1, "a": bits or 1}],
        "include_full_precision": estimator is None, "batch_size": 256,
        "dataset_options": {"shape": [3, 32, 32], "n_train": 256, "n_val": 0, "n_test": 256},
    })
    trials = spec.trials()
    return spec, (trials[-1] if estimator is None else trials[0])


def data(n: int, device: torch.device, channels_last: bool):
    """``n`` random 3×32×32 images and labels on ``device`` (the cost of a step does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g).to(device)


def epoch_timer(model_name, estimator, bits, *, device, n_train, channels_last=False, bf16=False, compile_mode=None,
                graphs=False):
    """A function that trains one more epoch of this configuration and returns its seconds (the first call
    includes any compilation or capture). Each configuration keeps its own model, optimizer and data.
    ``graphs``: the forward and backward through a CUDA graph captured per epoch, as the trainer does on a GPU
    (``workers.cuda_graphs``); otherwise eagerly, kernel by kernel."""
    spec, trial = make_trial(model_name, estimator, bits)
    torch.manual_seed(0)
    model = trial_model(spec, trial, num_classes=10, input_shape=(3, 32, 32)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), spec.optimizer)
    if compile_mode:
        torch._dynamo.config.recompile_limit = 64  # one compiled quantizer per layer shape
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    x, y = data(n_train, device, channels_last)
    loader = DeviceLoader(x, y, 256, shuffle=True, generator=torch.Generator(device=device).manual_seed(0),
                          **CIFAR_AUGMENT)

    def epoch() -> float:
        sync(device)
        t0 = time.perf_counter()
        graphed = graphed_forward(net, (256, 3, 32, 32), n_train // 256, device, enabled=True) if graphs else None
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            with graphed or contextlib.nullcontext(net) as forward:
                train_epoch(net, opt, loader, forward)
        sync(device)
        return time.perf_counter() - t0

    return epoch


def interleaved(timers: dict[str, callable], rounds: int, spent) -> dict[str, list[float]]:
    """Each timer's first epoch, then ``rounds`` rounds of one epoch of every timer in turn (a slow spell of
    the machine falls on all of them alike); stops early once ``spent()``. Returns label -> seconds."""
    times = {label: [t()] for label, t in timers.items()}
    for _ in range(rounds):
        if spent():
            break
        for label, t in timers.items():
            times[label].append(t())
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(model_name: str, estimator: str | None, bits: int | None, device: torch.device, steps: int = 5,
                 top: int = 0) -> tuple[int, float, float, list[tuple[str, float, float]]]:
    """(CUDA kernels per step, GPU busy ms per step, wall ms per step, the ``top`` kernels by GPU time as
    (name, launches per step, µs per step)), after a warm-up epoch, unprofiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    spec, trial = make_trial(model_name, estimator, bits)
    model = trial_model(spec, trial, num_classes=10, input_shape=(3, 32, 32)).to(device)
    opt = build_optimizer(model.parameters(), spec.optimizer)
    x, y = data(256 * steps, device, False)
    loader = DeviceLoader(x, y, 256, shuffle=True, generator=torch.Generator(device=device).manual_seed(0),
                          **CIFAR_AUGMENT)
    train_epoch(model, opt, loader)  # warm-up: cuDNN picks its algorithms, the allocator fills
    sync(device)
    t0 = time.perf_counter()
    train_epoch(model, opt, loader)
    sync(device)
    wall = (time.perf_counter() - t0) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_epoch(model, opt, loader)
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    def gpu_us(e) -> float:
        return getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)

    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(gpu_us(e))
    heaviest = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return (len(kernels) // steps, sum(map(gpu_us, kernels)) / 1e3 / steps, wall * 1e3,
            [(name[:90], len(t) / steps, sum(t) / steps) for name, t in heaviest])


def bits_label(estimator: str | None, bits: int | None) -> str:
    return f"{estimator} W{bits}A{bits}" if estimator else "float"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnet_a", help="the model of the variants and bit-width tables")
    p.add_argument("--n-train", type=int, default=50000, help="images per epoch")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds after each configuration's first epoch")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no new round or row after this many seconds")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--sections", nargs="+", default=["variants", "bits", "profile"],
                   choices=["variants", "bits", "profile"], help="the tables to measure")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to measure")
        return 0
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (smoke test)"
    print(f"`python bench/gpu_step.py {' '.join(sys.argv[1:] if argv is None else argv)}` on {card}, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}; batch 256, {args.n_train} images per epoch; "
          f"medians over {args.rounds} interleaved rounds after each configuration's first epoch\n")
    start = time.monotonic()

    def spent() -> bool:
        return time.monotonic() - start > args.budget_s

    def table(times: dict[str, list[float]], base_label: str, vs: str) -> None:
        base = statistics.median(times[base_label][1:] or times[base_label])
        print(f"| configuration | first epoch, s | later epochs, s (median; min) | images/s | speed vs {vs} |")
        print("|---|---:|---:|---:|---:|")
        for label, t in times.items():
            later = t[1:] or t
            med = statistics.median(later)
            print(f"| {label} | {t[0]:.2f} | {med:.2f}; {min(later):.2f} | {args.n_train / med:,.0f} "
                  f"| {base / med:.2f} |")
        print(flush=True)

    def timer(est, bits, **kw):
        return epoch_timer(args.model, est, bits, device=device, n_train=args.n_train, **kw)

    if "variants" in args.sections:
        variants_table(args, timer, table, spent)
    if "bits" in args.sections and not spent():
        print(f"### {args.model}, every bit width: eager steps and CUDA-graph steps\n")
        cells = [(None, None)] + [(e, b) for b in (1, 2, 3) for e in ("ste", "clipped_ste", "aqe")]
        timers = {}
        for e, b in cells:
            timers[f"{bits_label(e, b)}, eager"] = timer(e, b)
            timers[f"{bits_label(e, b)}, CUDA graphs"] = timer(e, b, graphs=True)
        table(interleaved(timers, args.rounds, spent), "float, eager", "float, eager")
    if "profile" in args.sections:
        profile_table(args, device, spent)
    print(f"\n({time.monotonic() - start:.0f} s)")
    return 0


def variants_table(args, timer, table, spent) -> None:
    print(f"### {args.model} W1A1 aqe: variants of one epoch\n")
    variants = {"today (fp32, TF32 convolutions)": {}, "channels-last": {"channels_last": True},
                "bf16 autocast": {"bf16": True}, "channels-last + bf16": {"channels_last": True, "bf16": True}}
    table(interleaved({k: timer("aqe", 1, **kw) for k, kw in variants.items()}, args.rounds, spent),
          "today (fp32, TF32 convolutions)", "today")
    if not args.skip_compile:
        for label, mode in [("torch.compile", "default"), ("torch.compile, reduce-overhead", "reduce-overhead")]:
            if spent():
                break
            try:
                t = timer("aqe", 1, compile_mode=mode)
                times = [t() for _ in range(1 + args.rounds)]
                later = statistics.median(times[1:])
                print(f"{label}: first epoch {times[0]:.2f} s, later {later:.2f} s\n", flush=True)
            except Exception as e:  # a variant that does not run here is a finding, not the end of the run
                print(f"{label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}\n", flush=True)


def profile_table(args, device, spent) -> None:
    print("### Where a step's time goes (torch.profiler, 5 steps after a warm-up epoch)\n")
    print("| model | configuration | CUDA kernels per step | GPU busy, ms per step | wall, ms per step | busy / wall |")
    print("|---|---|---:|---:|---:|---:|", flush=True)
    rows = [(args.model, None, None), *((args.model, "aqe", b) for b in (1, 2, 3)), ("resnet20", "aqe", 1)]
    heaviest = []
    for name, est, bits in rows:
        if spent():
            break
        k, busy, wall, top = profile_step(name, est, bits, device, top=12 if (est, bits) == ("aqe", 3) else 0)
        heaviest = top or heaviest
        print(f"| {name} | {bits_label(est, bits)} | {k} | {busy:.2f} | {wall:.2f} | {busy / wall:.2f} |", flush=True)
    if heaviest:
        print(f"\n{args.model} aqe W3A3, the kernels that take the most GPU time:\n")
        print("| kernel | launches per step | µs per step |\n|---|---:|---:|")
        for kname, n, us in heaviest:
            print(f"| `{kname}` | {n:.0f} | {us:.0f} |")


if __name__ == "__main__":
    raise SystemExit(main())

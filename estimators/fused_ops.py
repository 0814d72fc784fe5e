"""One-pass building blocks of the fused estimator Functions (LSQ, DSQ, PACT, EWGS, DoReFa).

Each full-size tensor operation is one pass over memory, and inside a network those passes, not
arithmetic, are what an estimator costs; these helpers do in one pass what the autograd
composition of the same formula does in several.
"""
from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def serial_numel_setting(value: str | None) -> int:
    """``BITBENCH_SERIAL_NUMEL``: unset or empty = 0 (off), else a whole number of elements ≥ 0."""
    if value is None or not value.strip():
        return 0
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"BITBENCH_SERIAL_NUMEL must be a whole number of elements ≥ 0, got {value!r}")
    return n


#: One intra-op thread for tensors up to SERIAL_NUMEL / (threads − 1) elements (see :func:`one_thread`);
#: 0 (the default) = never. 4194304 (4 Mi) suits a host busier than its cores.
SERIAL_NUMEL = serial_numel_setting(os.environ.get("BITBENCH_SERIAL_NUMEL"))


@contextmanager
def one_thread(x: torch.Tensor) -> Iterator[None]:
    """Run the enclosed ops on this thread alone when x is a small enough CPU tensor (off by default).

    Every ATen op on more than 32,768 elements is an OpenMP parallel region, which waits until each
    intra-op thread has had a core. On a machine busier than its cores (other jobs beside the trial)
    that wait is a scheduler slice per op, several milliseconds, while a pass over a few MB takes
    about a millisecond on one core; a fused estimator is 5–20 such ops per step. There, running
    tensors of up to SERIAL_NUMEL/(T − 1) elements on one thread bounds what the other T − 1 threads
    would have done against a step that itself takes ∝ 1/T (4 Mi elements at 2 threads, 1 Mi at 5,
    256 Ki at 17, with ``BITBENCH_SERIAL_NUMEL=4194304``). Where each trial has its cores (Ray gives
    a trial its CPUs and sets its thread count to them) the parallel region costs nothing to wait
    for, and one thread only loses the other threads' share: on a quiet 2-core machine the conv block
    step of ``bench/estimators.py`` at W2A2 took 1.04–1.09× float with the rule and 1.01–1.02× without
    (BENCHMARKS.md), so SERIAL_NUMEL is 0 unless set. ``torch.set_num_threads`` sets the calling
    thread's OpenMP and MKL counts (and the default a thread starting meanwhile takes up) and costs
    well under a microsecond; the previous count is restored on exit. Elementwise results do not
    depend on it; sums may round in another order.
    """
    n = torch.get_num_threads()
    if n == 1 or not SERIAL_NUMEL or x.device.type != "cpu" or x.numel() > SERIAL_NUMEL // (n - 1):
        yield
        return
    torch.set_num_threads(1)
    _set_aside.threads = n
    try:
        yield
    finally:
        _set_aside.threads = None
        torch.set_num_threads(n)


_set_aside = threading.local()  # the thread count one_thread set aside, for all_threads


@contextmanager
def all_threads() -> Iterator[None]:
    """Inside :func:`one_thread`, give back the threads it set aside for one compute-bound op (a
    transcendental such as tanh costs several times a memory pass, so splitting it pays for its one
    parallel region even on a busy machine). Elsewhere a no-op."""
    n = getattr(_set_aside, "threads", None)
    if n is None:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b as a 0-dim tensor: one fused pass (BLAS dot) when both are contiguous, else mul + sum."""
    if a.is_contiguous() and b.is_contiguous() and a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


def inside_grad(g: torch.Tensor, x: torch.Tensor, low: float, high: float, out: torch.Tensor | None = None):
    """g·1[low < x < high] in one pass (HardTanh's backward kernel; into ``out``, which may be g):
    the gradient torch's ``clamp(x, low, high)`` passes back (0 at x = low, high). NaN x gets 0
    from the vectorised kernel but g from its scalar tail, so callers that promise clamp's 0 there
    use :func:`zero_where_nan` when a NaN is possible."""
    if out is None:
        return torch.ops.aten.hardtanh_backward(g, x, low, high)
    return torch.ops.aten.hardtanh_backward.grad_input(g, x, low, high, grad_input=out)


def zero_where_nan(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad with 0 wherever x is NaN (in place): clamp's backward gives 0 there."""
    return grad.masked_fill_(torch.isnan(x), 0)


def above_grad(g: torch.Tensor, x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """g·1[x ≥ limit or x is NaN] in one pass: the gradient ``torch.where(x < limit, ·, limit)`` sends
    to ``limit``. ``limit`` is a 0-dim tensor in x's dtype (x ≥ limit ⟺ x > the float just below it)."""
    below = torch.nextafter(limit, torch.full_like(limit, -float("inf")))
    return torch.ops.aten.threshold_backward(g, x, below.item())


def on_one_thread(fn: Callable) -> Callable:
    """Decorator for an autograd Function's ``forward(ctx, x, …)`` or ``backward(ctx, g)``: the body
    runs under :func:`one_thread` of its first tensor."""

    @functools.wraps(fn)
    def wrapper(ctx, x, *args):
        with one_thread(x):
            return fn(ctx, x, *args)

    return wrapper

"""Pseudo-gradients as one compiled loop: ``torch.compile`` (Inductor's vectorised C++) on the CPU.

An eager pseudo-gradient is several ATen passes over x and g (|x|, a power, masks, ·g). Inductor
fuses the same formula into one loop that reads x and g once and writes the gradient once, with
SLEEF's vectorised log2 where ATen's CPU ``log2`` is 2.4× slower. ReSTE's power is where that
pays: per Mi elements on one thread it saves 1.0–1.2 ms of 2.1–2.2 (2.0–2.1×). EDE's and ApproxSign's
pseudo-gradients, the ternary Q and AQE's mix and scaled mask were faster as compiled loops in isolation
but made resnet20 slower (a compiled call costs ~20 µs more, and the loops lost on tensors fresh from
HardTanh), so they stay eager (BENCHMARKS.md, "A compiled ReSTE pseudo-gradient" and "Compiled forward
formulas: measured and dropped"). A formula is compiled once per
process for every size (x and g are flattened to 1-dim tensors; the schedule's scalars are 0-dim
tensors, so a new epoch's value compiles nothing). A process's first compile takes 9.6 s with an
empty Inductor cache (once per machine) and 2.3 s with a warm one, a further formula 0.04–0.6 s;
the first resnet20 epoch of a fresh process was still 2 % faster cold and 10 % faster warm.

``BITBENCH_COMPILE`` chooses where it is used:
  auto  (default) as a JIT compiles a hot loop: a formula is compiled once this process has run it
        eagerly over HOT_ELEMENTS elements (about a tenth of a CIFAR-10 epoch of resnet20); a
        short run, such as one on the digits, stays eager and never pays for a compile
  on    at the first call (benchmarks of the steady state, tests)
  off   never
Only CPU float32 tensors outside autograd (not a double backward) qualify. If compiling fails (no
C++ compiler, say), a warning says so once and everything stays eager. Values agree with the
eager formulas to a few ulp (SLEEF's and ATen's transcendentals round differently;
``tests/test_compiled_grads.py``).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

MODES = ("auto", "on", "off")
#: ``auto`` compiles a formula after it has run eagerly over this many elements
HOT_ELEMENTS = 1 << 30


def compile_setting(value: str | None) -> str:
    """``BITBENCH_COMPILE``: unset or empty = auto; else one of MODES (any case)."""
    mode = (value or "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"BITBENCH_COMPILE must be one of {', '.join(MODES)}, got {value!r}")
    return mode


MODE = compile_setting(os.environ.get("BITBENCH_COMPILE"))
_kernels: dict[Callable, Callable] = {}  # formula → its compiled kernel
_eager_elements: dict[Callable, int] = {}  # formula → elements it has run eagerly (auto)
_failed: list[str] = []  # the first compile error, once one happened


def eligible(x: torch.Tensor, g: torch.Tensor) -> bool:
    """x and g are contiguous CPU float32 tensors of one shape, and autograd is off (an ordinary backward)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and g.dtype == x.dtype and g.shape == x.shape
            and x.is_contiguous() and g.is_contiguous() and not torch.is_grad_enabled())


def run(formula: Callable, x: torch.Tensor, g: torch.Tensor, *scalars: float) -> torch.Tensor | None:
    """``formula(x, g, *scalars)`` as one compiled loop, or None where ``MODE`` says not (yet) or x and g are
    not :func:`eligible`: the caller's eager code then runs. ``formula`` is elementwise in x and g and
    takes the scalars as 0-dim tensors."""
    if MODE == "off" or _failed or not eligible(x, g):
        return None
    kernel = _kernels.get(formula)
    if kernel is None:
        if MODE == "auto":
            seen = _eager_elements[formula] = _eager_elements.get(formula, 0) + x.numel()
            if seen <= HOT_ELEMENTS:
                return None
        kernel = _kernels[formula] = torch.compile(formula, dynamic=True, fullgraph=True)
    args = [torch.tensor(s, dtype=x.dtype) for s in scalars]
    flat = [t.view(-1).detach() for t in (x, g)]  # not views: Dynamo would guard the base, a kernel per ndim
    try:
        return kernel(*flat, *args).view(x.shape)
    except Exception as e:  # any compile failure (no compiler, a broken toolchain): eager from now on
        _failed.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"bitbench: compiled pseudo-gradients are off, the eager ones run ({_failed[0][:300]})",
                      RuntimeWarning, stacklevel=2)
        return None

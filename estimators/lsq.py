"""LSQ: learned step size quantization (Esser et al., ICLR 2020)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import quantizers as Qz
from .base import Estimator, register_estimator, round_ste
from .fused_ops import dot, inside_grad, on_one_thread, zero_where_nan


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Value x, gradient scaled by ``scale``."""
    return (x - x * scale).detach() + x * scale


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward, identity backward."""
    return x + (Qz.sign(x) - x).detach()


def lsq_composed(v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, binary: bool) -> torch.Tensor:
    """LSQ's quantizer as an autograd composition (the reference :class:`LSQFunction` matches):
    ``round_ste(clamp(v/s, −Q_N, Q_P))·s``, or ``sign_ste(·)·s`` when ``binary``."""
    u = (v / s).clamp(-q_n, q_p)
    return (sign_ste(u) if binary else round_ste(u)) * s


class LSQFunction(torch.autograd.Function):
    """y = round(clamp(v/s, −Q_N, Q_P))·s (sign(·)·s when binary), with LSQ's gradients in v and s.

    The forward value is that of :func:`lsq_composed` bit for bit (``round_ste`` and ``sign_ste``
    return round(u) and ±1 exactly on the clamped range), with two new tensors (u, kept for the
    backward, and y) and the rest in place, against 6 autograd ops; the backward is one new tensor
    and two dot products, against about 12 ops, from u = v/s, the output y and the step s:

      ∂L/∂v = g·1[−Q_N < u < Q_P]                       (torch's clamp backward: 0 at the ends and NaN)
      ∂L/∂s = Σ g·(round(u) − u·1[−Q_N < u < Q_P]) = Σ g·y / s − Σ (∂L/∂v)·u

    The composition computes ∂L/∂v as (g·s)/s and sums ∂L/∂s in another order, so they agree to
    rounding (one ulp in ∂L/∂v). ``s`` is the 0-dim step in v's dtype after LSQ's gradient scaling.
    A step that is not positive and finite (never reached by training) goes through the composition.
    """

    @staticmethod
    @on_one_thread
    def forward(ctx, v, s, q_n: int, q_p: int, binary: bool):
        u = torch.div(v, s)
        y = torch.clamp(u, -q_n, q_p)
        if binary:  # sign_ste(y)·s = copysign(s, y) for s > 0; + 0·y keeps NaN a NaN (y is finite or NaN)
            y = torch.copysign(s, y).add_(y, alpha=0)
        else:  # round(y)·s + 0: round_ste gives +0 where round gives −0, so does adding 0
            y = y.round_().mul_(s).add_(0.0)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(u, y, s)
            ctx.bounds = (-q_n, q_p)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_one_thread
    def backward(ctx, g):
        u, y, s = ctx.saved_tensors
        gv = inside_grad(g, u, *ctx.bounds)
        gs = None
        if ctx.needs_input_grad[1]:
            gys = dot(g, y)
            if torch.isnan(gys):  # a NaN input (or gradient): clamp's backward gives 0 at NaN u
                zero_where_nan(gv, u)
            gs = (gys / s - dot(gv, u)).to(s.dtype)
        elif torch.isnan(u).any():
            zero_where_nan(gv, u)
        return (gv if ctx.needs_input_grad[0] else None), gs, None, None, None


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, binary: bool) -> torch.Tensor:
    """:func:`lsq_composed`'s value and gradients; one :class:`LSQFunction` when s > 0 is finite."""
    if not bool(torch.isfinite(s) & (s > 0)):
        return lsq_composed(v, s, q_n, q_p, binary)
    return LSQFunction.apply(v, s, q_n, q_p, binary)


@register_estimator
class LSQ(Estimator):
    """Learned step size: a per-layer step s trained with its own gradient.

    forward:  v̂ = s·round(clip(v/s, −Q_N, Q_P))     (b ≥ 2: Q_N = 2^(b−1), Q_P = 2^(b−1) − 1;
                                                      b = 1: v̂ = s·sign(v/s) with Q_N = Q_P = 1)
    backward: ∂v̂/∂v = 1[−Q_N < v/s < Q_P]             (torch's clamp backward: the ends count as outside)
              ∂v̂/∂s = g·(round(v/s) − v/s) inside, g·(−Q_N) at or below, g·Q_P at or above;  g = 1/√(N·Q_P)
    init:     s = 2·mean|v|/√Q_P on the first batch.  Signed for weights and activations alike
              (activations come from HardTanh and are signed).
    """

    initialized: torch.Tensor  # a buffer (typed for the type checker)

    name = "lsq"
    paper = "Esser, McKinstry, Bablani, Appuswamy, Modha, 'Learned Step Size Quantization', ICLR 2020"
    clip_weights = None
    grids = ("learned_step",)

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.q_n, self.q_p = (1, 1) if bits == 1 else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))

    def _init_step(self, v: torch.Tensor) -> None:
        if not bool(self.initialized):
            with torch.no_grad():
                self.step.fill_(float(2 * v.abs().mean() / math.sqrt(self.q_p)))
                self.initialized.fill_(True)

    def train_forward(self, v):
        self._init_step(v)
        n = v.numel() if self.role == "weight" else v[0].numel()
        s = grad_scale(self.step.to(v.dtype), 1.0 / math.sqrt(n * self.q_p))
        return lsq_quantize(v, s, self.q_n, self.q_p, self.bits == 1)

    def hard(self, v):
        with torch.no_grad():
            return self.train_forward(v)

    def schedule_values(self):
        return {"step": float(self.step.detach())}

    def level_set(self):
        if self.bits == 1:
            return Qz.levels("sign", 1)
        return torch.arange(-self.q_n, self.q_p + 1, dtype=torch.float64)

    def scale(self, v):
        return self.step.detach().to(v.dtype)

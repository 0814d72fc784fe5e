"""DSQ: differentiable soft quantization (Gong et al., ICCV 2019)."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import quantizers as Qz
from .base import Estimator, Param, register_estimator


def dsq_soft(x: torch.Tensor, alpha: torch.Tensor, bits: int, low: float = -1.0, high: float = 1.0):
    """(Q_S(x), hard(x)): DSQ's tanh staircase on [low, high] with 2^bits levels, and its rounding.

    Δ = (u − l)/(2^b − 1), i = interval of x, m_i = l + (i + ½)Δ,
    k = log(2/α − 1)/Δ, s = 1/tanh(½kΔ) = 1/(1 − α), φ = s·tanh(k(x − m_i)),
    Q_S = l + Δ·(i + (φ + 1)/2),  hard = l + Δ·(i + (sign φ + 1)/2).
    """
    n = 2**bits - 1
    delta = (high - low) / n
    xc = x.clamp(low, high)
    i = torch.floor((xc.detach() - low) / delta).clamp(0, n - 1)
    m = low + (i + 0.5) * delta
    k = torch.log(2 / alpha - 1) / delta
    s = 1 / (1 - alpha)
    phi = s * torch.tanh(k * (xc - m))
    soft = low + delta * (i + (phi + 1) / 2)
    hard = low + delta * (i + (Qz.sign(phi.detach()) + 1) / 2)
    return soft, hard


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ a·b as a 0-dim tensor: one fused pass (BLAS dot) when both are contiguous, else mul + sum."""
    if a.is_contiguous() and b.is_contiguous() and a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
        return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


class DSQFunction(torch.autograd.Function):
    """y = hard(x) of :func:`dsq_soft`; backward: the closed-form gradients of Q_S in x and α.

    Computes the same forward value as ``soft + (hard - soft).detach()`` (bit for bit: on
    [−1, 1] ``hard − soft`` is exact, so adding ``soft`` back returns ``hard``) with far fewer
    passes over the tensor, and keeps only t = tanh(k(clip(x) − m_i)), d = clip(x) − m_i and
    the mask of x strictly inside (l, u) for the backward:

      ∂Q_S/∂x = (Δ/2)·s·k·(1 − t²)·1[l < x < u]   (torch's clamp backward: 0 at x = l, u and NaN)
      ∂Q_S/∂α = (Δ/2)·(s²·t + s·(1 − t²)·d·∂k/∂α),   ∂k/∂α = −2 / (Δ·α·(2 − α)),  ∂s/∂α = s²

    ``alpha`` is the already clamped 0-dim α (in x's dtype); its gradient is Σ ∂Q_S/∂α·grad.
    The rounding of every forward step is the same as in :func:`dsq_soft`, so t, and with it
    the output, are identical.
    """

    @staticmethod
    def forward(ctx, x, alpha, bits: int, low: float = -1.0, high: float = 1.0):
        n = 2**bits - 1
        delta = (high - low) / n
        k = torch.log(2 / alpha - 1) / delta
        xc = x.clamp(low, high)
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Fresh full-size buffers cost page faults, so the one scratch buffer becomes the output.
        buf = torch.empty_like(xc)
        inside = None
        if need_x:  # 1[l < x < u] (torch's clamp backward; NaN → False), before buf is reused
            if low == -high:
                inside = torch.lt(torch.abs(xc, out=buf), high)
            else:
                inside = (xc > low).logical_and_(xc < high)
        if n == 1:  # m and the two levels, rounded in x's dtype as dsq_soft rounds them (host-side scalars)
            zero = torch.zeros((), dtype=x.dtype)
            m0, lo_lvl, hi_lvl = float((zero + 0.5) * delta + low), float(low + delta * zero), float(low + delta * (zero + 1))
        if n == 1 and m0 == 0.0 and lo_lvl == -hi_lvl:
            # one interval centred on 0: i = 0, m = +0 so d = xc − m = xc bit for bit, hard = ±hi
            # (i is NaN for NaN x in dsq_soft: clamp(t, hi, hi) keeps that NaN)
            d = xc
            t = torch.mul(xc, k).tanh_()
            hard = torch.clamp(t, hi_lvl, hi_lvl, out=buf).copysign_(t)
        else:
            ih = xc.sub(low).div_(delta).floor_().clamp_(0, n - 1).add_(0.5)  # i + ½ (exact)
            d = ih.mul(delta).add_(low)  # m_i
            d = torch.sub(xc, d, out=d)  # xc − m_i
            t = torch.mul(d, k).tanh_()
            # i + (sign φ + 1)/2 = (i + ½) ± ½ exactly (s > 0, so sign φ = sign t; NaN stays in ih)
            half = torch.full((), 0.5, dtype=x.dtype, device=x.device)
            hard = ih.add_(torch.copysign(half, t, out=buf)).mul_(delta).add_(low)
        if need_x or need_a:
            ctx.save_for_backward(t, d if need_a else None, inside, alpha, k)
            ctx.delta = delta
        return hard

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        t, d, inside, alpha, k = ctx.saved_tensors
        delta = ctx.delta
        s = 1 / (1 - alpha)
        g1t = torch.ops.aten.tanh_backward(g, t)  # g·(1 − t²)
        grad_x = grad_a = None
        if ctx.needs_input_grad[1]:
            dk = -2 / (delta * alpha * (2 - alpha))
            grad_a = (delta / 2) * (s * s * _dot(g, t) + s * dk * _dot(g1t, d))
            grad_a = grad_a.to(alpha.dtype)
        if ctx.needs_input_grad[0]:
            c = (delta / 2) * s * k
            grad_x = torch.where(inside, g1t, g1t.new_zeros(()), out=g1t).mul_(c)
        return grad_x, grad_a, None, None, None


def dsq_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int, low: float = -1.0, high: float = 1.0):
    """hard(x) with DSQ's gradient: the value of ``soft + (hard − soft).detach()`` from
    :func:`dsq_soft` and its gradients in x and α, in one :class:`DSQFunction`."""
    return DSQFunction.apply(x, alpha, bits, low, high)


@register_estimator
class DSQ(Estimator):
    """Differentiable Soft Quantization: hard forward, gradient of the tanh soft staircase.

    forward:  y = hard(x) = l + Δ·round((clip(x, l, u) − l)/Δ)            ([l, u] = [−1, 1])
    backward: ∂y/∂x = ∂Q_S/∂x = (Δ/2)·s·k·(1 − tanh²(k(x − m_i)))·1[l < x < u]  (clamp's backward)
              ∂y/∂α = ∂Q_S/∂α, α learnable per layer (the "characteristic variable")
    with Q_S, k, s, m_i as in :func:`dsq_soft`; small α → a sharper, more step-like Q_S.
    """

    name = "dsq"
    paper = "Gong, Liu, Jiang, Li, Hu, Lin, Yu, Yan, 'Differentiable Soft Quantization: Bridging Full-Precision and Low-Bit Neural Networks', ICCV 2019"
    params = {"alpha_init": Param(0.2, "initial characteristic variable α ∈ (0, 1)", low=1e-3, high=0.99)}
    grids = ("uniform_signed",)

    def __init__(self, bits=1, role="weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.alpha = nn.Parameter(torch.tensor(float(self.hparams["alpha_init"])))

    def _alpha(self, dtype):
        return self.alpha.to(dtype).clamp(1e-4, 0.999)

    def train_forward(self, x):
        return dsq_quantize(x, self._alpha(x.dtype), self.bits)

    def hard(self, x):
        with torch.no_grad():
            return dsq_soft(x, self._alpha(x.dtype), self.bits)[1]

    def schedule_values(self):
        return {"alpha": float(self.alpha.detach())}

    def level_set(self):
        return Qz.levels("uniform_signed", self.bits)

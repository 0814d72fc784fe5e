"""DSQ: differentiable soft quantization (Gong et al., ICCV 2019)."""
from __future__ import annotations

import torch
from torch import nn

from . import quantizers as Qz
from .base import Estimator, Param, register_estimator
from .fused_ops import all_threads, dot, inside_grad, on_one_thread, zero_where_nan


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


class DSQFunction(torch.autograd.Function):
    """y = hard(x) of :func:`dsq_soft`; backward: the closed-form gradients of Q_S in x and α.

    Computes the same forward value as ``soft + (hard - soft).detach()`` (bit for bit: on
    [−1, 1] ``hard − soft`` is exact, so adding ``soft`` back returns ``hard``) with far fewer
    passes over the tensor, and keeps only t = tanh(k(clip(x) − m_i)), d = clip(x) − m_i and
    x for the backward:

      ∂Q_S/∂x = (Δ/2)·s·k·(1 − t²)·1[l < x < u]   (torch's clamp backward: 0 at x = l, u and NaN)
      ∂Q_S/∂α = (Δ/2)·(s²·t + s·(1 − t²)·d·∂k/∂α),   ∂k/∂α = −2 / (Δ·α·(2 − α)),  ∂s/∂α = s²

    ``alpha`` is the already clamped 0-dim α (in x's dtype); its gradient is Σ ∂Q_S/∂α·grad.
    The rounding of every forward step is the same as in :func:`dsq_soft`, so t, and with it
    the output, are identical.
    """

    @staticmethod
    @on_one_thread
    def forward(ctx, x, alpha, bits: int, low: float = -1.0, high: float = 1.0):
        n = 2**bits - 1
        delta = (high - low) / n
        k = torch.log(2 / alpha - 1) / delta
        xc = x.clamp(low, high)
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if n == 1:  # m and the two levels, rounded in x's dtype as dsq_soft rounds them (host-side scalars)
            zero = torch.zeros((), dtype=x.dtype)
            m0 = float((zero + 0.5) * delta + low)
            lo_lvl, hi_lvl = float(low + delta * zero), float(low + delta * (zero + 1))
        if n == 1 and m0 == 0.0 and lo_lvl == -hi_lvl:
            # one interval centred on 0: i = 0, m = +0 so d = xc − m = xc bit for bit, hard = ±hi
            # (i is NaN for NaN x in dsq_soft: clamp(t, hi, hi) keeps that NaN)
            d = xc
            with all_threads():
                t = torch.mul(xc, k).tanh_()
            hard = torch.clamp(t, hi_lvl, hi_lvl).copysign_(t)
        else:
            ih = xc.sub(low).div_(delta).floor_().clamp_(0, n - 1).add_(0.5)  # i + ½ (exact)
            d = ih.mul(delta).add_(low)  # m_i
            d = torch.sub(xc, d, out=d)  # xc − m_i
            # i + (sign φ + 1)/2 = (i + ½) ± ½ exactly: sign φ = sign(s·tanh(k·d)) = sign d, as s and k
            # have one sign (that of 1 − α); NaN stays in ih. xc's buffer is free for the ±½.
            half = torch.full((), 0.5, dtype=x.dtype, device=x.device)
            hard = ih.add_(torch.copysign(half, d, out=xc)).mul_(delta).add_(low)
            with all_threads():
                t = torch.mul(d, k).tanh_()
        if need_x or need_a:
            ctx.save_for_backward(t, d if need_a else None, x if need_x else None, alpha, k)
            ctx.delta, ctx.low, ctx.high = delta, low, high
        return hard

    @staticmethod
    @torch.autograd.function.once_differentiable
    @on_one_thread
    def backward(ctx, g):
        t, d, x, alpha, k = ctx.saved_tensors
        delta = ctx.delta
        s = 1 / (1 - alpha)
        g1t = torch.ops.aten.tanh_backward(g, t)  # g·(1 − t²)
        grad_x = grad_a = None
        nan_seen = None
        if ctx.needs_input_grad[1]:
            gt = dot(g, t)
            nan_seen = bool(torch.isnan(gt))  # a NaN x (or g) shows here; otherwise no check is needed
            dk = -2 / (delta * alpha * (2 - alpha))
            grad_a = (delta / 2) * (s * s * gt + s * dk * dot(g1t, d))
            grad_a = grad_a.to(alpha.dtype)
        if ctx.needs_input_grad[0]:
            # 1[l < x < u]: torch's clamp backward, in HardTanh's backward kernel
            grad_x = inside_grad(g1t, x, ctx.low, ctx.high, out=g1t)
            if nan_seen if nan_seen is not None else bool(torch.isnan(x).any()):
                zero_where_nan(grad_x, x)
            grad_x = grad_x.mul_((delta / 2) * s * k)
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
    paper = ("Gong, Liu, Jiang, Li, Hu, Lin, Yu, Yan, 'Differentiable Soft Quantization: Bridging Full-Precision "
             "and Low-Bit Neural Networks', ICCV 2019")
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

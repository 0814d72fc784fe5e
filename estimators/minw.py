"""Estimators on the MINW-Net level sets: sign (1 bit), ternary (2 bits), powers of two (≥3 bits).

:class:`MinwEstimator` holds what AQE and the sign-family baselines (STE, clipped STE,
ApproxSign, EDE, ReSTE, XNOR) share: the hard quantizer ``Q`` chosen by bit width (Chen et al.,
Eq. 4, 21, 22) or by ``grid`` (``estimators.grids``), its parameters, and its statistics: per
tensor for weights, per sample / per batch / running for activations (``act_stats``).
Subclasses give the training forward and the pseudo-gradient.
"""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch

from . import quantizers as Qz
from .base import Estimator, Param, surrogate
from .fused_ops import one_thread
from .grids import FIXED_GRIDS

#: how activation statistics are taken (see :class:`MinwEstimator`)
ACT_STATS = ("per_sample", "per_batch", "running")
DEFAULT_ACT_STATS = "running"  # docs/results/activation_statistics: as accurate as per_sample, a prediction depends on
#                                 the image only, and inference needs no float reduction per image (protocol v2)
#: BatchNorm's default momentum, for the running estimate
DEFAULT_ACT_MOMENTUM = 0.1


def increasing_fractions(value) -> list[float]:
    """A list of strictly increasing numbers in (0, 1].

    How many the bit width needs is checked when the quantizer is built."""
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError("expected a non-empty list of numbers")
    if value[0] <= 0 or value[-1] > 1 or any(b <= a for a, b in zip(value, value[1:], strict=False)):
        raise ValueError("expected strictly increasing fractions in (0, 1]")
    return [float(v) for v in value]


#: the parameters of MINW-Net's levels (ternary's and powers of two's thresholds)
LEVEL_PARAMS = {
    "delta_ratio": Param(0.7, "ternary threshold Δ = delta_ratio·mean|x| (TWN's rule)", low=0.0, high=1.0),
    "pow2_thresholds": Param(
        None, "≥3-bit powers-of-two thresholds as increasing fractions of max|x| (default 0.02, 0.07, 0.14 at 3 bits)",
        validate=increasing_fractions,
    ),
}
MINW_PARAMS = {
    **LEVEL_PARAMS,
    "grid": Param("minw", "levels Q quantizes to: minw (sign / ternary / powers of two), uniform (DoReFa's), "
                  "uniform_signed (EWGS's, DSQ's); the pseudo-gradient is the same on every grid",
                  choices=FIXED_GRIDS),
    "act_stats": Param(DEFAULT_ACT_STATS, "activations' mean|x| (ternary) and max|x| (powers of two): per sample, "
                       "per batch (the authors' code), or a running estimate in training, frozen in eval",
                       choices=ACT_STATS),
    "act_momentum": Param(DEFAULT_ACT_MOMENTUM, "act_stats=running: s ← (1 − m)·s + m·s_batch per training batch",
                          low=1e-4, high=1.0),
}


class MinwEstimator(Estimator):
    """Base for estimators whose hard quantizer Q is MINW-Net's: sign / ternary / pow2 by bits.

    ``grid`` swaps Q for another fixed grid (``uniform``: DoReFa's levels, ``uniform_signed``:
    EWGS's and DSQ's); a subclass's training forward and pseudo-gradient stay what they are.

    Q's statistic s (ternary Δ = delta_ratio·s, s = mean|x|; powers of two: thresholds t_j·s,
    s = max|x|) is taken over the whole tensor for weights (TWN), and for activations by ``act_stats``:
      per_sample  over each sample (every dimension but the first): a prediction needs no other
                  sample, but inference needs a float reduction per image
      per_batch   over the whole batch, in training and eval (the authors' n-BQ-NN code): a
                  prediction depends on the rest of its batch
      running     training: s_r ← (1 − m)·s_r + m·s_batch before each batch's forward (s_r = s_batch
                  at the first), and Q uses s_r; eval: s_r frozen, so Q's thresholds are constants of
                  the layer (batch-independent). m = ``act_momentum``. s_r is the buffer
                  ``running_stat`` (with ``running_stat_set``), saved in the state dict; a state dict
                  without it loads (the estimate restarts at the next training batch), and before any
                  training batch eval uses the batch's own s.
    No gradient flows through s in any mode. Sign (1 bit) and the uniform grids use no statistic.
    """

    params = MINW_PARAMS
    grids: ClassVar[tuple[str, ...]] = FIXED_GRIDS
    cuda_graphs = True  # statistics through torch.where on CUDA: no host sync (tests/test_cuda_graphs.py)
    running_stat: torch.Tensor  # buffers of act_stats=running (typed for the type checker)
    running_stat_set: torch.Tensor

    def __init__(self, bits: int = 1, role: str = "weight", **params):
        super().__init__(bits=bits, role=role, **params)
        self.quantizer = Qz.grid_quantizer(self.hparams.get("grid", "minw"), bits, role)
        self.act_stats = self.hparams.get("act_stats", "per_sample") if role == "activation" else None
        self._dims = "sample" if self.act_stats == "per_sample" else None
        self.tracks_running_stat = self.act_stats == "running" and self.quantizer in ("ternary", "pow2")
        self._stat: torch.Tensor | None = None  # the statistic this training forward tracked (see forward)
        if self.tracks_running_stat:
            self.register_buffer("running_stat", torch.tensor(0.0))
            self.register_buffer("running_stat_set", torch.tensor(False))
        if self.quantizer == "pow2":  # fail at construction, not at the first batch
            Qz.pow2(torch.ones(1), bits=bits, thresholds=self.hparams["pow2_thresholds"])

    # -- statistics ------------------------------------------------------------------------------
    def batch_stat(self, x: torch.Tensor) -> torch.Tensor:
        """s over the whole tensor: mean|x| (ternary) or max|x| (powers of two).

        max|x| = max(−min x, max x) from one read of x (no |x| written; exact, + 0 makes a zero +0)."""
        if self.quantizer == "ternary":
            return x.abs().mean()
        low, high = torch.aminmax(x)
        return torch.maximum(low.neg(), high).add_(0.0)

    @torch.no_grad()
    def track(self, x: torch.Tensor) -> torch.Tensor:
        """One training batch's update of the running statistic (no host sync); returns it in x's dtype."""
        batch = self.batch_stat(x.detach()).to(self.running_stat.dtype)
        m = self.hparams["act_momentum"]
        if self.running_stat.device.type == "cpu":  # the flag read costs nothing: fewer small ops
            if bool(self.running_stat_set):
                self.running_stat.lerp_(batch, m)
            else:
                self.running_stat.copy_(batch)
                self.running_stat_set.fill_(True)
        else:
            self.running_stat.copy_(torch.where(self.running_stat_set, self.running_stat.lerp(batch, m), batch))
            self.running_stat_set.fill_(True)
        return self.running_stat.to(x.dtype)

    def _given_stat(self, x: torch.Tensor) -> torch.Tensor | None:
        """The running statistic Q uses (the batch's before any training batch), or None to take it over dims.

        In a tracking training forward, the value :meth:`track` just returned (the batch's statistic is taken
        once). Otherwise on the CPU the flag is read (no device to wait for) and the batch's statistic taken
        only when the estimate is unset; elsewhere both go into a ``where`` (no host sync)."""
        if not self.tracks_running_stat:
            return None
        if self._stat is not None:
            return self._stat
        if x.device.type == "cpu":
            return self.running_stat.to(x.dtype) if bool(self.running_stat_set) else self.batch_stat(x.detach())
        return torch.where(self.running_stat_set, self.running_stat.to(x.dtype), self.batch_stat(x.detach()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.tracks_running_stat:  # a checkpoint from before act_stats=running: keep the unset estimate
            for name in ("running_stat", "running_stat_set"):
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- quantization ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.tracks_running_stat and not self.frozen_stats:
            self._stat = self.track(x)
            try:
                return super().forward(x)
            finally:
                self._stat = None
        return super().forward(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x): the hard quantizer of this grid and bit width (no gradient of its own)."""
        q = self.quantizer
        if q == "sign":
            return Qz.sign(x)
        if q == "ternary":
            return Qz.ternary(x, self.hparams["delta_ratio"], dims=self._dims, mean_abs=self._given_stat(x))
        if q == "pow2":
            return Qz.pow2(x, self.bits, self.hparams["pow2_thresholds"], dims=self._dims,
                           max_abs=self._given_stat(x))
        return Qz.uniform(x, self.bits, signed=q == "uniform_signed")

    def hard(self, x):
        return self.quantize(x)

    def level_set(self):
        return Qz.levels(self.quantizer, self.bits)

    def packed_encoding(self) -> str | None:
        """Unscaled sign / ternary / powers of two; None for another grid, and for activations with
        per-batch statistics (a prediction would depend on the rest of its batch). Per-sample statistics
        run per image in the packed engine; a running estimate is exported as the layer's constant."""
        if self.quantizer not in ("sign", "ternary", "pow2"):
            return None
        if self.role != "weight" and self.quantizer != "sign" and self.hparams["act_stats"] == "per_batch":
            return None
        return self.quantizer

    def pseudo_grad(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """∂L/∂x given x and ∂L/∂y. A subclass sets ``pseudo_grad = None`` for the identity."""
        raise NotImplementedError

    def pseudo_grad_behind_hardtanh(self, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """:meth:`pseudo_grad` at x = clamp(h, −1, 1) from HardTanh(−1, 1)'s input h (a subclass may know an
        exact form that needs no clamp)."""
        return self.pseudo_grad(h.clamp(-1, 1), g)

    def train_forward(self, x):
        """Behind ``nn.Hardtanh()`` the pseudo-gradient is taken from the HardTanh's input h, which its node
        keeps for its own backward (:func:`hardtanh_input`), so x itself is not kept: its memory is freed as
        soon as the next layer is done with it, as in the float network."""
        h = None if self.pseudo_grad is None else hardtanh_input(x)
        if h is not None:
            return surrogate(x, self.quantize, self.pseudo_grad_behind_hardtanh, kept=h)
        return surrogate(x, self.quantize, self.pseudo_grad)


def clip_mask(x: torch.Tensor, limit: float = 1.0) -> torch.Tensor:
    """1[|x| ≤ limit] as a tensor of x's dtype."""
    return (x.abs() <= limit).to(x.dtype)


def from_hardtanh(x: torch.Tensor, limit: float = 1.0) -> bool:
    """x is, unmodified, the output of a HardTanh whose range lies in [−limit, limit] (a MINW-Net block's
    activation, the next layer's input), read off the autograd graph: then |x| ≤ limit holds everywhere but
    at NaN without a look at x."""
    fn = x.grad_fn
    return (fn is not None and x._version == 0 and fn.name() == "HardtanhBackward0"
            and -limit <= getattr(fn, "_saved_min_val", -math.inf) and getattr(fn, "_saved_max_val", math.inf) <= limit)


def hardtanh_input(x: torch.Tensor) -> torch.Tensor | None:
    """h when x is, unmodified, HardTanh(h) with the range exactly [−1, 1] (``nn.Hardtanh()``, a MINW-Net
    activation): the input the HardTanh's node keeps for its own backward (detached), else None."""
    fn = x.grad_fn
    if not from_hardtanh(x) or getattr(fn, "_saved_min_val", None) != -1 or getattr(fn, "_saved_max_val", None) != 1:
        return None
    h = getattr(fn, "_saved_self", None)
    return h.detach() if isinstance(h, torch.Tensor) else None


def clipped_grad(x: torch.Tensor, g: torch.Tensor, scale: float | None = None, limit: float = 1.0) -> torch.Tensor:
    """g·1[|x| ≤ limit] (times ``scale`` when given), never modifying g.

    When x is a HardTanh output within the range (:func:`from_hardtanh`), the mask is all ones and g itself
    (or g·scale) is the answer without reading x (NaN x, which HardTanh passes on, keeps its g there).
    Otherwise on the CPU one read of x (min and max) first: when all of x lies in [−limit, limit], as
    clipped latent weights do for limit 1, the same. Otherwise HardTanh's backward kernel in one pass: it
    zeroes |x| ≥ its bound, and with the bound = the next float above ``limit`` in x's dtype that is exactly
    |x| ≤ limit, so latent weights clipped to ±1 keep their gradient.
    """
    with one_thread(x):
        if from_hardtanh(x, limit) or (x.device.type == "cpu" and x.numel() and _within(x, limit)):
            return g if scale is None else g * scale
        bound = _float_above(limit, x.dtype)
        grad = torch.ops.aten.hardtanh_backward(g, x, -bound, bound)
        return grad if scale is None else grad.mul_(scale)


def clipped_surrogate(x: torch.Tensor, forward_fn, scale: float | None = None, limit: float = 1.0) -> torch.Tensor:
    """forward_fn(x) with ∂L/∂x = :func:`clipped_grad` (x, ∂L/∂y, scale, limit).

    When x is a HardTanh output within the limit (:func:`from_hardtanh`, asked in the forward) the mask is all
    ones: the gradient is ∂L/∂y (times ``scale``) and x is not kept for the backward, so it is freed as soon as
    the next layer is done with it, as in the float network.
    """
    if from_hardtanh(x, limit):
        return surrogate(x, forward_fn, scale)
    return surrogate(x, forward_fn, functools.partial(clipped_grad, scale=scale, limit=limit))


def _within(x: torch.Tensor, limit: float) -> bool:
    """All of x lies in [−limit, limit], from one read of x (min and max; False at NaN)."""
    low, high = torch.aminmax(x)
    return low.item() >= -limit and high.item() <= limit


@functools.cache
def _float_above(limit: float, dtype: torch.dtype) -> float:
    """The next float above ``limit`` (rounded to ``dtype``) in ``dtype``."""
    v = torch.tensor(limit, dtype=dtype)
    return torch.nextafter(v, v + 1).item()

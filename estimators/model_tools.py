"""Helpers that act on a whole model: training progress, latent-weight clipping, weight levels, storage."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .base import FLOAT_BITS, Estimator
from .layers import QUANTIZED_LAYERS


def set_progress(model: nn.Module, epoch: int, total_epochs: int) -> dict[str, float]:
    """Tell every estimator in ``model`` the training progress; return :func:`schedule_values`.

    The trainer calls it once per epoch, before training epoch ``epoch`` (1 … total_epochs).
    """
    for m in model.modules():
        if isinstance(m, Estimator):
            m.set_progress(epoch, total_epochs)
    return schedule_values(model)


def schedule_values(model: nn.Module) -> dict[str, float]:
    """Scheduled or learned quantities, averaged over layers.

    Keys: ``<estimator>.<key>`` for schedules (the same for every layer and role, e.g. ``aqe.alpha``),
    ``<estimator>.<role>.<key>`` for learned values (per layer and role, e.g. ``lsq.weight.step``).
    """
    sums: dict[str, list[float]] = {}
    for m in model.modules():
        if isinstance(m, Estimator):
            prefix = m.name if m.scheduled else f"{m.name}.{m.role}"
            for k, v in m.schedule_values().items():
                sums.setdefault(f"{prefix}.{k}", []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def cuda_graphs_capturable(model: nn.Module) -> bool:
    """True when every estimator in ``model`` can be captured in a CUDA graph (``Estimator.cuda_graphs``)."""
    return all(m.cuda_graphs for m in model.modules() if isinstance(m, Estimator))


def soft_estimators(model: nn.Module) -> list[Estimator]:
    """The estimators in ``model`` whose training forward differs from their hard one (``soft_forward``)."""
    return [m for m in model.modules() if isinstance(m, Estimator) and m.soft_forward]


@contextmanager
def training_forward(model: nn.Module) -> Iterator[bool]:
    """Run ``model``'s *training forward* inside, for measuring it; yields whether it differs from eval's.

    The training forward is the network being trained as it computes in training, without
    changing it: every :func:`soft_estimators` member runs its ``train_forward`` (AQE's
    α·Q(x) + (1 − α)·x at the current α), every other module as in ``eval()`` (BatchNorm
    normalises with its running statistics and updates none, no dropout, the other estimators'
    hard forward, which equals their training forward's output). No parameter or buffer changes.
    On exit the model is in eval mode.
    """
    soft = soft_estimators(model)
    model.eval()
    for m in soft:
        m.train()
        m.frozen_stats = True  # a running activation statistic is used, not updated
    try:
        yield bool(soft)
    finally:
        for m in soft:
            m.frozen_stats = False
        model.eval()


@torch.no_grad()
def calibrate_activation_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """Estimate the running activation statistics (``act_stats=running``) of ``model`` from ``batches``
    without training it: training-mode forwards with no gradient and BatchNorm's momentum at 0, so
    that its running mean and variance stay as they are (s ← (1 − m)·s + m·s_batch per batch, the
    first batch's s taken as is). For a model that was built or loaded but not trained, before
    exporting it or evaluating it as it will be used. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    model.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model


@torch.no_grad()
def clip_latent_weights(model: nn.Module) -> int:
    """Clip the latent weights of quantized layers whose estimator asks for it (after each step).

    Returns the number of layers clipped.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS) and m.weight_quantizer is not None:
            rng = m.weight_quantizer.clip_weights
            if rng is not None:
                m.weight.clamp_(*rng)
                n += 1
    return n


@torch.no_grad()
def weight_levels(model: nn.Module) -> list[torch.Tensor]:
    """The level index of every quantized weight, one uint8 tensor per quantized layer (w_bits < 32).

    The eval-mode quantizer gives ``hard(w) = scale(w)·level``; the index is the position of
    ``level`` in ``level_set()`` (nearest level, so a changing scale such as XNOR's or LSQ's does
    not count as a change). For 1-bit weights the index is the sign.
    """
    out = []
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS) and m.weight_quantizer is not None:
            q, w = m.weight_quantizer, m.weight
            level = q.hard(w)
            scale = q.scale(w)
            if scale is not None:
                scale = torch.as_tensor(scale, dtype=level.dtype, device=level.device).expand_as(level)
                level = torch.where(scale != 0, level / torch.where(scale != 0, scale, 1), 0)
            levels = q.level_set().to(level.device, level.dtype)
            out.append(torch.bucketize(level, (levels[1:] + levels[:-1]) / 2).to(torch.uint8))
    return out


def level_change_fraction(before: list[torch.Tensor], after: list[torch.Tensor]) -> float | None:
    """Fraction of quantized weights whose level differs between two :func:`weight_levels`
    snapshots (sign flips at 1 bit); None for a model without quantized weights."""
    total = sum(b.numel() for b in before)
    if total == 0:
        return None
    changed = sum(int((b != a).sum()) for b, a in zip(before, after, strict=True))
    return changed / total


@dataclass(frozen=True)
class WeightStorage:
    """Weight counts and storage of a model; ``bits`` counts quantized weights at their width."""

    quantized_weights: int
    float_weights: int
    bits: int

    @property
    def mib(self) -> float:
        return self.bits / 8 / 2**20


def weight_storage(model: nn.Module, include_float: bool = False) -> WeightStorage:
    """Count the weights of the quantized layers (conv/linear kernels; no BN, no biases).

    ``bits`` sums numel·w_bits over quantized kernels, plus 32·numel for float kernels of
    quantized layers when ``include_float`` (the paper's "parameter capacity" leaves them out).
    """
    q = f = bits = 0
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS):
            n = m.weight.numel()
            if m.w_bits == FLOAT_BITS:
                f += n
                bits += 32 * n if include_float else 0
            else:
                q += n
                bits += m.w_bits * n
    return WeightStorage(q, f, bits)

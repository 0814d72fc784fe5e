"""One trial: train one grid cell (estimator × bits × seed) and report every epoch.

:func:`run_trial` is the whole contract (docs/CONTRACTS.md): seeded, deterministic where torch
allows on the CPU, the data set kept on the device, one ``on_epoch(metrics, state)`` call per
epoch, and a ``state`` from which ``run_trial(resume_state=state)`` continues bit-exactly on the
CPU. It knows nothing about Ray; ``workers.sweep`` wraps it in a Tune trainable. Data sets come
as in-memory :class:`DataSplits` or, for image folders (ImageNet), as a ``FolderSplits`` with the same
interface whose loaders stream and decode files.
"""
from __future__ import annotations

import copy
import gc
import logging
import math
import os
import random
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import estimators

from .cuda_graphs import graphed_forward
from .datasets import DataSplits, load_dataset
from .malloc import keep_freed_memory
from .models import trial_model
from .provenance import process_provenance, provenance, ray_placement
from .records import METRIC_KEYS as METRIC_KEYS  # the keys of each on_epoch metrics dict
from .spec import ExperimentSpec, LRSchedule, Optimizer, TrialSpec

STATE_VERSION = 1
FINAL_KEYS = ("final_test_acc", "final_test_top5", "final_val_acc", "best_val_acc", "best_epoch", "selected_test_acc",
              "selected_epoch", "last_epoch_test_acc", "last_epoch_val_acc", "bn_reestimated", "epochs",
              "weight_bits_total", "weight_mib", "packed_bytes", "packed_agreement")

OnEpoch = Callable[[dict, dict], None]
#: the end-of-trial packed check, ``(model, test_x, test_y) -> {"packed_bytes", "packed_agreement"}``
#: (``workers.packed.packed_summary``; the sweep passes it in, the trainer does not import the packed engine)
PackedCheck = Callable[[nn.Module, torch.Tensor, torch.Tensor], dict]
OnStart = Callable[[dict], None]
log = logging.getLogger(__name__)


# -- building blocks -------------------------------------------------------------------------
class NoCudaDeviceError(RuntimeError):
    """A trial given a GPU (``resources.gpu > 0``) sees no CUDA device, and its spec does not allow the CPU."""


def no_cuda_situation(spec: ExperimentSpec) -> str:
    """What a GPU trial that sees no CUDA device asked for, where it runs, what Ray and torch see."""
    cuda = torch.version.cuda
    return (f"the trial asked for {spec.resources.gpu:g} GPU but torch sees no CUDA device on host "
            f"{process_provenance()['host']} (Ray GPU ids {ray_placement()['ray_gpu_ids']}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__} "
            f"{f'built with CUDA {cuda}' if cuda else 'built without CUDA'})")


def resolve_device(spec: ExperimentSpec, device: str | torch.device | None = None) -> torch.device:
    """``device`` if given; else CUDA when the spec asks for a GPU (``resources.gpu > 0``), the CPU when not.

    A GPU trial that sees no CUDA device raises :class:`NoCudaDeviceError` (on a misconfigured GPU node a
    sweep would otherwise train ~100× slower and say nothing), unless ``resources.cpu_fallback``: then
    the CPU, with a warning in the log.
    """
    if device is not None:
        dev = torch.device(device)
    elif spec.resources.gpu <= 0:
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda")
    elif spec.resources.cpu_fallback:
        log.warning("%s; training on the CPU (resources.cpu_fallback)", no_cuda_situation(spec))
        dev = torch.device("cpu")
    else:
        raise NoCudaDeviceError(f"{no_cuda_situation(spec)}; it trains on the CPU only if the spec sets "
                                "resources.cpu_fallback")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def deterministic(enabled: bool):
    """Ask torch for deterministic kernels (warn only) while inside; restore the setting after."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def build_optimizer(params, cfg: Optimizer) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum, Nesterov) with the spec's lr and weight decay."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}; known: adam, adamw, sgd")


def build_scheduler(opt: torch.optim.Optimizer, cfg: LRSchedule, epochs: int):
    """A per-epoch scheduler (stepped after each epoch): constant, exponential (×gamma per
    epoch), cosine (to eta_min at the last epoch) or step (×gamma after each milestone epoch)."""
    sched = torch.optim.lr_scheduler
    if cfg.name == "constant":
        return sched.ExponentialLR(opt, gamma=1.0)
    if cfg.name == "exponential":
        return sched.ExponentialLR(opt, gamma=cfg.gamma)
    if cfg.name == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=cfg.eta_min)
    if cfg.name == "step":
        return sched.MultiStepLR(opt, milestones=sorted(cfg.milestones), gamma=cfg.gamma)
    raise ValueError(f"unknown lr schedule {cfg.name!r}; known: constant, exponential, cosine, step")


def build_model(spec: ExperimentSpec, trial: TrialSpec, data: DataSplits) -> nn.Module:
    """:func:`workers.models.trial_model` for ``data``'s classes and input shape."""
    return trial_model(spec, trial, num_classes=data.num_classes, input_shape=data.input_shape)


def _to_cpu_copy(obj: Any) -> Any:
    """Deep copy with every tensor detached and cloned to the CPU (state must not alias live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one epoch -------------------------------------------------------------------------------
def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, batches, forward=None) -> tuple[float, float, int]:
    """One pass in train mode; latent weights clipped after every step. Returns (mean loss,
    accuracy, images). Sums stay on the device: one host sync per epoch. ``forward`` computes
    the model's output instead of ``model`` (:func:`workers.cuda_graphs.graphed_forward`)."""
    model.train()
    forward = forward or model
    loss_sum = correct = None
    n = 0
    for xb, yb in batches:
        out = forward(xb)
        loss = F.cross_entropy(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        estimators.clip_latent_weights(model)
        with torch.no_grad():
            b_loss, b_correct = loss.detach() * len(yb), (out.argmax(1) == yb).sum()
            loss_sum = b_loss if loss_sum is None else loss_sum + b_loss
            correct = b_correct if correct is None else correct + b_correct
        n += len(yb)
    if n == 0:
        return float("nan"), float("nan"), 0
    return loss_sum.item() / n, correct.item() / n, n


#: top-5 accuracy is reported for data sets with at least this many classes (with 5 or fewer it is always 1)
TOP5_MIN_CLASSES = 6


@torch.no_grad()
def accuracies(model: nn.Module, batches, *, top5: bool = False) -> tuple[float | None, float | None]:
    """(top-1, top-5) accuracy in eval mode (hard quantizers); None for an empty split, and top-5
    None unless ``top5``. Top-1: argmax = label (the first maximum on ties); top-5: the label is
    among the 5 largest logits."""
    model.eval()
    return _hits(model, batches, top5)


def _hits(model: nn.Module, batches, top5: bool) -> tuple[float | None, float | None]:
    """:func:`accuracies` in whatever mode ``model`` is in."""
    hits, n = None, 0
    for xb, yb in batches:
        out = model(xb)
        h = [(out.argmax(1) == yb).sum()]
        if top5:
            h.append((out.topk(5, 1).indices == yb[:, None]).any(1).sum())
        h = torch.stack(h)
        hits = h if hits is None else hits + h
        n += len(yb)
    if not n:
        return None, None
    values = [v / n for v in hits.tolist()]
    return values[0], values[1] if top5 else None


def evaluate(model: nn.Module, batches) -> float | None:
    """Top-1 accuracy in eval mode (hard quantizers), or None for an empty split."""
    return accuracies(model, batches)[0]


@torch.no_grad()
def evaluate_training_forward(model: nn.Module, batches) -> float | None:
    """Top-1 accuracy of the training forward (:func:`estimators.training_forward`: the soft
    estimators' ``train_forward``, BatchNorm on its running statistics, nothing updated); None
    when no estimator's training forward differs from its hard one (it would equal
    :func:`evaluate`) or for an empty split. The model is left in eval mode."""
    with estimators.training_forward(model) as differs:
        return _hits(model, batches, False)[0] if differs else None


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches) -> int:
    """Recompute every BatchNorm's running mean and variance over ``batches`` with the final weights.

    The rest of the model runs in eval mode (hard quantizers: the network that is evaluated);
    each BatchNorm restarts its statistics and takes the cumulative average over all batches
    (``momentum=None``). No parameter changes. Returns the number of BatchNorm layers; the model
    is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for xb, _ in batches:
            model(xb)
    finally:
        for bn, momentum in zip(norms, momenta, strict=False):
            bn.momentum = momentum
            bn.eval()
    return len(norms)


# -- the trial -------------------------------------------------------------------------------
def _rng_state(loader_gen: torch.Generator, device: torch.device) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "loader": loader_gen.get_state(),
        "loader_device": loader_gen.device.type,
    }


def _set_rng_state(rng: dict, loader_gen: torch.Generator, device: torch.device) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    if rng["loader_device"] != loader_gen.device.type:
        raise ValueError(f"checkpoint was trained on {rng['loader_device']}; it cannot resume bit-exactly on "
                         f"{loader_gen.device.type}")
    loader_gen.set_state(rng["loader"])


#: test images the packed XNOR/SHIFT engine is checked on at the end of a low-bit trial, at most
#: PACKED_CHECK_BYTES of float32 input (2,000 CIFAR images; 445 at 3×224×224)
PACKED_CHECK_SAMPLES = 2000
PACKED_CHECK_BYTES = 256 * 2**20


def packed_metrics(model: nn.Module, trial: TrialSpec, data: DataSplits, check: PackedCheck | None) -> dict:
    """``packed_bytes`` and ``packed_agreement`` from ``check`` on the first PACKED_CHECK_SAMPLES test
    images (fewer for large images: PACKED_CHECK_BYTES); both None for float trials or without a check."""
    if check is None or trial.is_float:
        return {"packed_bytes": None, "packed_agreement": None}
    n = max(1, min(PACKED_CHECK_SAMPLES, PACKED_CHECK_BYTES // (4 * math.prod(data.input_shape))))
    return check(model, *data.head("test", n))


def final_metrics(last: dict, best: dict, epochs: int, model: nn.Module, reestimated: dict | None = None) -> dict:
    """The ``final`` record of CONTRACTS.md from the last epoch's metrics and the best-so-far.

    ``final_*`` is the trained network's result: the last epoch's, or the accuracies measured
    after BatchNorm re-estimation when ``reestimated`` (``{"val_acc", "test_acc", "test_top5"}``) is given;
    ``last_epoch_*`` always the last epoch's own. ``selected_*`` is the test accuracy of the
    epoch with the best validation accuracy (the earliest on ties): chosen on validation, never on test.
    """
    storage = estimators.weight_storage(model)
    after = reestimated or last
    return {
        "final_test_acc": after["test_acc"], "final_val_acc": after["val_acc"],
        "final_test_top5": after.get("test_top5"),
        "last_epoch_test_acc": last["test_acc"], "last_epoch_val_acc": last["val_acc"],
        "bn_reestimated": reestimated is not None,
        "best_val_acc": best["val_acc"], "best_epoch": best["epoch"],
        "selected_test_acc": best.get("test_acc"), "selected_epoch": best["epoch"], "epochs": epochs,
        "weight_bits_total": storage.bits, "weight_mib": storage.mib,
    }


def run_trial(
    spec: ExperimentSpec,
    trial: TrialSpec,
    *,
    on_epoch: OnEpoch,
    resume_state: dict | None = None,
    device: str | torch.device | None = None,
    data_dir=None,
    threads: int | None = None,
    packed_check: PackedCheck | None = None,
    on_start: OnStart | None = None,
) -> dict:
    """Train ``trial`` of ``spec`` for ``spec.epochs`` epochs; return the ``final`` dict.

    After each epoch e = 1..E calls ``on_epoch(metrics, state)``: ``metrics`` exactly as in
    CONTRACTS.md, ``state`` a self-contained CPU copy (model, optimizer, scheduler, every RNG
    including the loader's, epoch, best-so-far, last metrics). ``resume_state`` continues from
    such a state; on the CPU the result is bit-identical to an uninterrupted run. ``threads``
    sets torch's intra-op threads; ``device`` defaults to :func:`resolve_device`. ``packed_check``
    (e.g. ``workers.packed.packed_summary``) gives the final ``packed_*`` keys (None without one).
    ``on_start`` is called once, before anything is loaded, with the attempt's
    :func:`workers.provenance.provenance` (versions, machine, Ray placement, device). The process keeps
    freed memory for reuse from here on (:func:`workers.malloc.keep_freed_memory`). When it returns or
    raises, the trial's model, optimizer and data set are freed (an exception's frames are cleared) and
    :func:`release_memory` has run, so the next trial in the same process (Tune's ``reuse_actors``)
    starts with the device's memory free.
    """
    keep_freed_memory()
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(spec, device)
    if on_start is not None:
        on_start(provenance(dev))
    with deterministic(dev.type == "cpu"):
        try:
            return _run(spec, trial, on_epoch, resume_state, dev, data_dir, packed_check)
        except BaseException as e:
            # whoever keeps the error (Tune, while it retries the trial) must not keep the attempt's model,
            # optimizer and on-device data set alive through the locals of its traceback's frames
            traceback.clear_frames(e.__traceback__)
            raise
        finally:
            release_memory(dev)


def drops_last_batch(n_train: int, batch_size: int) -> bool:
    """Whether an epoch drops its last batch: when it would hold a single image (BatchNorm cannot train on
    one sample), unless that image is the whole training set (dropping it would train on nothing)."""
    return n_train % batch_size == 1 and n_train > 1


def release_memory(dev: torch.device) -> None:
    """After a trial: collect what it left in reference cycles and, on CUDA, hand the allocator's cached
    blocks back to the driver (other processes sharing the GPU can use them)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _run(spec, trial, on_epoch, resume_state, dev, data_dir, packed_check) -> dict:
    epochs = spec.epochs
    seed_everything(trial.seed)
    data = load_dataset(spec.dataset, seed=trial.seed, device=dev, data_dir=data_dir, **dict(spec.dataset_options))
    seed_everything(trial.seed)  # initialisation does not depend on what loading drew
    model = build_model(spec, trial, data).to(dev)
    opt = build_optimizer(model.parameters(), spec.optimizer)
    sched = build_scheduler(opt, spec.lr_schedule, epochs)
    gen = torch.Generator(device=dev).manual_seed(trial.seed)
    n_train = len(data.train_y)
    drop_last = drops_last_batch(n_train, spec.batch_size)
    train_loader = data.loader("train", spec.batch_size, generator=gen, drop_last=drop_last)
    val_loader, test_loader = data.loader("val", spec.batch_size), data.loader("test", spec.batch_size)
    top5 = data.num_classes >= TOP5_MIN_CLASSES

    start, best, last = 0, {"val_acc": None, "epoch": None, "test_acc": None}, None
    if resume_state is not None:
        if resume_state.get("version") != STATE_VERSION or resume_state.get("trial_key") != trial.key:
            raise ValueError(f"resume_state is not a version-{STATE_VERSION} state of trial {trial.key!r}")
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        _set_rng_state(resume_state["rng"], gen, dev)
        start, best, last = resume_state["epoch"], dict(resume_state["best"]), resume_state["last"]

    levels = estimators.weight_levels(model)  # at the start of each epoch (the end of the one before)
    for epoch in range(start + 1, epochs + 1):
        t0 = time.perf_counter()
        estimators.set_progress(model, epoch, epochs)
        lr = opt.param_groups[0]["lr"]
        with graphed_forward(model, (spec.batch_size, *data.input_shape), n_train // spec.batch_size, dev) as fwd:
            train_loss, train_acc, n = train_epoch(model, opt, train_loader, fwd)
        _sync(dev)
        train_s = time.perf_counter() - t0
        val_acc, (test_acc, test_top5) = evaluate(model, val_loader), accuracies(model, test_loader, top5=top5)
        val_acc_soft = evaluate_training_forward(model, val_loader)
        sched.step()
        levels_before, levels = levels, estimators.weight_levels(model)
        if val_acc is not None and (best["val_acc"] is None or val_acc > best["val_acc"]):
            best = {"val_acc": val_acc, "epoch": epoch, "test_acc": test_acc}
        last = {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_acc": val_acc,
            "val_acc_soft": val_acc_soft, "test_acc": test_acc, "test_top5": test_top5, "lr": float(lr),
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_s": n / train_s if train_s > 0 else 0.0,
            "weight_flips": estimators.level_change_fraction(levels_before, levels),
            "device": str(dev),
            "schedule": {k: float(v) for k, v in estimators.schedule_values(model).items()},
        }
        state = {
            "version": STATE_VERSION, "trial_key": trial.key, "epoch": epoch, "best": dict(best), "last": dict(last),
            "model": _to_cpu_copy(model.state_dict()), "optimizer": _to_cpu_copy(opt.state_dict()),
            "scheduler": _to_cpu_copy(sched.state_dict()), "rng": _to_cpu_copy(_rng_state(gen, dev)),
        }
        on_epoch(dict(last), state)

    if last is None:
        raise ValueError("run_trial trained no epoch and has no resume_state to finish from")
    reestimated = None
    if spec.bn_reestimate:
        gen = torch.Generator(device=dev).manual_seed(trial.seed)  # the same batches after a resume
        reestimate_batchnorm(model, data.loader("train", spec.batch_size, generator=gen, drop_last=drop_last))
        test_acc, test_top5 = accuracies(model, test_loader, top5=top5)
        reestimated = {"val_acc": evaluate(model, val_loader), "test_acc": test_acc, "test_top5": test_top5}
    return {**final_metrics(last, best, epochs, model, reestimated), **packed_metrics(model, trial, data, packed_check)}

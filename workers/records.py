"""The vocabulary of bitbench's records, defined once (docs/CONTRACTS.md): statuses, metric keys,
the full-precision reference, labels and keys of trials, and the record shapes the store returns.

Plain Python, no torch: the service, the dashboard and the CLI import it (``workers`` resolves its
other names lazily, so ``import workers.records`` loads nothing else).
"""
from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypedDict


class Status(StrEnum):
    """A run's or a trial's status: queued → running → done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: every status, as plain strings, in the order above
STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
#: the statuses a run or trial ends in
FINISHED: tuple[str, ...] = (Status.DONE.value, Status.FAILED.value, Status.CANCELLED.value)
#: the statuses of a run or trial that is not finished yet
ACTIVE: tuple[str, ...] = (Status.QUEUED.value, Status.RUNNING.value)

#: bit width of a full-precision layer (the value of ``estimators.FLOAT_BITS``, which needs torch)
FLOAT_BITS = 32
#: estimator label, estimator name and bit-configuration label of the full-precision reference
FLOAT_LABEL = "float"

#: what a leaderboard or figure ranks by → the Trial field: the trained network's test accuracy, or
#: the test accuracy at the epoch with the best validation accuracy
RANK_METRIC_FIELDS = {"final": "final_test_acc", "selected": "selected_test_acc"}
DEFAULT_RANK_METRIC = "final"


def metric_field(metric: str) -> str:
    """The Trial field of ``metric`` (:data:`RANK_METRIC_FIELDS`); ValueError names the known ones."""
    try:
        return RANK_METRIC_FIELDS[metric]
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(RANK_METRIC_FIELDS)}") from None


# -- labels and keys ------------------------------------------------------------------------------
def estimator_label(name: str, params: Mapping[str, Any] | None = None) -> str:
    """``name``, or ``name[k=v,…]`` with the user-given parameters sorted by name."""
    if not params:
        return name
    return f"{name}[{','.join(f'{k}={params[k]}' for k in sorted(params))}]"


def trial_key(label: str, w_bits: int, a_bits: int, seed: int) -> str:
    """A trial's key, unique within its run: ``aqe[backward=alg1]-w1a1-s0``."""
    return f"{label}-w{w_bits}a{a_bits}-s{seed}"


def trial_label(trial: Mapping[str, Any]) -> str:
    """A Trial record's label (its ``estimator_label``, else its estimator's name)."""
    return trial.get("estimator_label") or trial.get("estimator") or "?"


def bit_config(w_bits: int | None, a_bits: int | None) -> tuple[int, int]:
    """(weight bits, activation bits) with every floating-point width (16, 32, missing) as :data:`FLOAT_BITS`."""
    def width(bits: int | None) -> int:
        return FLOAT_BITS if bits is None or bits >= 16 else int(bits)

    return width(w_bits), width(a_bits)


def config_label(config: tuple[int, int]) -> str:
    """``W2A1`` for (2, 1); ``float`` for the full-precision reference (32, 32)."""
    w, a = config
    return FLOAT_LABEL if (w, a) == (FLOAT_BITS, FLOAT_BITS) else f"W{w}A{a}"


def config_sort_key(config: tuple[int, int]) -> tuple:
    """Order of bit configurations: total bits, then weight bits; the float reference last."""
    w, a = config
    return ((w, a) == (FLOAT_BITS, FLOAT_BITS), w + a, w, a)


# -- record shapes (the store returns these; service/api/schemas.py mirrors them) ---------------
class Progress(TypedDict):
    """A run's trials counted by status."""

    queued: int
    running: int
    done: int
    failed: int
    cancelled: int


class Run(TypedDict):
    """One run (a spec in the queue); timestamps are ISO-8601 UTC text."""

    id: int
    name: str
    status: str
    dataset: str
    model: str
    spec: dict[str, Any]
    spec_hash: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    trial_count: int
    protocol: str
    protocol_label: str
    cancel_requested: bool
    progress: Progress


class Trial(TypedDict):
    """One grid cell of a run: estimator × bits × seed, with its final metrics once done."""

    id: int
    run_id: int
    key: str
    estimator: str
    estimator_label: str
    estimator_params: dict[str, Any]
    w_bits: int
    a_bits: int
    seed: int
    status: str
    attempts: int
    epochs_done: int
    final_test_acc: float | None
    final_val_acc: float | None
    best_val_acc: float | None
    selected_test_acc: float | None
    selected_epoch: int | None
    packed_bytes: int | None
    packed_agreement: float | None
    device: str | None
    provenance: dict | None  # where and with what the latest attempt trained (workers.provenance)
    started_at: str | None
    finished_at: str | None
    error: str | None
    protocol: str
    protocol_label: str
    grid: str | None  # the quantizer grid its estimator quantizes to (estimators.grids); None for float


class Metric(TypedDict):
    """One epoch of one trial (what ``run_trial`` reports and the metrics table holds)."""

    epoch: int
    train_loss: float | None
    train_acc: float | None
    val_acc: float | None
    val_acc_soft: float | None
    test_acc: float | None
    test_top5: float | None
    lr: float | None
    epoch_seconds: float | None
    images_per_s: float | None
    weight_flips: float | None
    device: str | None
    schedule: dict[str, float]


class TrialWithMetrics(Trial):
    """A Trial record with its Metric records by epoch."""

    metrics: list[Metric]


class TrialResult(Trial):
    """A finished Trial record with the trainer's ``final`` dict."""

    final: dict[str, Any]


class LeaderboardRow(TypedDict):
    """One estimator at one (protocol, w_bits, a_bits): its ``metric`` over seeds, one trial per seed (the
    latest finished); ``set_aside`` counts the older repeats of a seed left out."""

    protocol: str
    protocol_label: str
    dataset: str
    model: str
    w_bits: int
    a_bits: int
    estimator_label: str
    grid: str | None
    metric: str
    n: int
    set_aside: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    packed_bytes: int | None
    packed_agreement: float | None
    rank: int
    best: bool


#: a Metric record's keys, in order
METRIC_KEYS: tuple[str, ...] = tuple(Metric.__annotations__)
#: a Trial record's keys, in order
TRIAL_KEYS: tuple[str, ...] = tuple(Trial.__annotations__)
#: a Run record's keys but ``progress``, in order
RUN_KEYS: tuple[str, ...] = tuple(k for k in Run.__annotations__ if k != "progress")

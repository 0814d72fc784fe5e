"""Response models of the HTTP API: the record shapes of :mod:`workers.records` (``RunOut`` = ``Run``,
``TrialOut`` = ``Trial``, ``MetricOut`` = ``Metric``, ``LeaderboardRow`` = ``LeaderboardRow``, field for
field; a test holds them together) with descriptions for /docs."""
from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.records import RANK_METRIC_FIELDS, STATUSES

RunStatus = Literal[STATUSES]  # type: ignore[valid-type]
TrialStatus = RunStatus
if TYPE_CHECKING:  # the type checker sees a str; pydantic and FastAPI the Literal of the shared names
    RankMetric = str
else:
    RankMetric = Literal[tuple(RANK_METRIC_FIELDS)]


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ErrorItem(_Out):
    loc: list[str | int] = Field(description="where the problem is, e.g. ['body', 'optimizer', 'lr']")
    msg: str
    type: str


class ErrorOut(_Out):
    """Every 4xx answer: FastAPI's ``detail`` list (422s may carry more keys, such as ``input``)."""

    detail: list[ErrorItem]


class RunCreated(_Out):
    id: int
    trial_count: int
    status: RunStatus
    location: str


class DryRunOut(_Out):
    """What queueing a spec would do (``POST /runs?dry_run=1``; nothing is queued)."""

    name: str
    dataset: str
    model: str
    spec_hash: str
    trials: int
    trials_by_label: dict[str, int]
    epochs: int
    train_images_per_epoch: int | None = Field(None, description="null where unknown without reading the data")
    estimated_gpu_s: float | None = Field(None, description="single-GPU training time from bench/gpu.py's recorded "
                                                            "figures; null when none are recorded (see estimate)")
    estimate: str = Field(description="how the estimate was made, or why there is none")
    data_files: list[str] = Field(description="files the data set reads, relative to the data directory")


class Progress(_Out):
    done: int = 0
    running: int = 0
    queued: int = 0
    failed: int = 0
    cancelled: int = 0


class Epochs(_Out):
    """Epochs stored so far over all trials, against the grid's total."""

    done: int
    total: int


class RunOut(_Out):
    id: int
    name: str
    status: RunStatus
    dataset: str
    model: str
    spec: dict[str, Any]
    spec_hash: str
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    trial_count: int
    protocol: str = Field(description="the protocol id (workers.protocol): what its trials measure, but "
                          "the estimators, bits and seeds")
    protocol_label: str = Field(description="the protocol, readable: data set/model · epochs · optimizer "
                                "schedule · batch size · options")
    cancel_requested: bool = False
    progress: Progress


class RunDetail(RunOut):
    epochs: Epochs | None = None
    current_epochs: dict[str, int] = Field(
        default_factory=dict, description="running trials: trial key → epochs stored so far")


class RunPage(_Out):
    items: list[RunOut]
    total: int
    limit: int
    offset: int


class MetricOut(_Out):
    epoch: int
    train_loss: float | None = None
    train_acc: float | None = None
    val_acc: float | None = None
    val_acc_soft: float | None = Field(None, description="validation accuracy of the training forward (AQE's soft "
                                       "mix), for estimators whose training forward differs from eval's; else null")
    test_acc: float | None = None
    test_top5: float | None = Field(None, description="top-5 test accuracy (data sets with at least 6 classes)")
    lr: float | None = None
    epoch_seconds: float | None = None
    images_per_s: float | None = None
    weight_flips: float | None = Field(
        None, description="fraction of quantized weights whose level changed in the epoch")
    device: str | None = None
    schedule: dict[str, Any] = Field(default_factory=dict)


class TrialOut(_Out):
    id: int
    run_id: int
    key: str
    estimator: str
    estimator_label: str
    estimator_params: dict[str, Any] = Field(default_factory=dict)
    w_bits: int
    a_bits: int
    seed: int
    status: TrialStatus
    attempts: int = 0
    epochs_done: int = 0
    final_test_acc: float | None = None
    final_val_acc: float | None = None
    best_val_acc: float | None = None
    selected_test_acc: float | None = Field(None, description="test accuracy at the epoch with the best val accuracy")
    selected_epoch: int | None = None
    packed_bytes: int | None = Field(None, description="size of the packed XNOR/SHIFT export")
    packed_agreement: float | None = Field(None, description="packed engine's agreement with the model")
    device: str | None = None
    provenance: dict[str, Any] | None = Field(
        None, description="where and with what the latest attempt trained: bitbench version and git commit; "
        "Python, torch, Ray and CUDA versions; CPU, GPU, host; Ray node id and IP, ray_gpu_ids; torch device")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    protocol: str = Field(description="the trial's protocol: its run's, or a named method's own where its "
                          "first/last-layer policy differs")
    protocol_label: str
    grid: str | None = Field(None, description="the quantizer grid its estimator quantizes to (GET /catalog lists "
                             "the grids); null for the float reference")


class TrialDetail(TrialOut):
    metrics: list[MetricOut]


class LeaderboardRow(_Out):
    protocol: str = Field(description="the protocol id (workers.protocol): what its trials measure, but "
                          "the estimators, bits and seeds")
    protocol_label: str = Field(description="the protocol, readable: data set/model · epochs · optimizer "
                                "schedule · batch size · options")
    dataset: str
    model: str
    w_bits: int
    a_bits: int
    estimator_label: str
    grid: str | None = Field(None, description="the quantizer grid of the estimator's trials (GET /catalog lists "
                             "the grids); null for the float reference")
    metric: RankMetric = Field(description="final: the trained network's test accuracy; selected: the test "
                               "accuracy at the epoch with the best validation accuracy")
    n: int = Field(description="seeds counted: one trial per seed, the latest finished")
    set_aside: int = Field(0, description="older finished trials of a counted seed, left out")
    mean: float | None
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    packed_bytes: int | None = None
    packed_agreement: float | None = None
    rank: int
    best: bool


class Catalog(_Out):
    estimators: list[dict[str, Any]] = Field(description="name, paper, formula, params (default, doc, choices, range)")
    methods: list[dict[str, Any]] = Field(
        description="named published methods: name, title, estimator, params, cells (w_bits, a_bits, tables, "
                    "first_last_float), citation")
    models: list[str]
    datasets: list[str]
    bits: list[int] = Field(description="allowed bit widths; 32 means float")
    max_trials: int


class Health(_Out):
    status: Literal["ok", "error"]
    database: str
    schema_version: str | None = None

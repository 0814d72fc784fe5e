"""The store: the one place that knows SQL.

Plain functions whose first argument is a ``Session``; they return plain JSON-ready dicts
(records, docs/CONTRACTS.md) with ISO-8601 UTC timestamps. Functions that write commit before
they return; readers leave the session's transaction to the caller. Split by capability:

- :mod:`.records` — runs, trials and their metrics: create, read, record a trial's progress, cancel.
- :mod:`.results` — what finished trials add up to: the leaderboard, a run's results and export,
  the data sets and models present, a run's report archive.
- :mod:`.queue` — the dispatcher's side: claim, heartbeat, finish, release and requeue runs.

Records
- Run: ``{id, name, status, dataset, model, spec, spec_hash, created_at, started_at,
  finished_at, error, trial_count, cancel_requested, progress: {done, running, queued, failed,
  cancelled}}``
- Trial: ``{id, run_id, key, estimator, estimator_label, estimator_params, w_bits, a_bits, seed,
  status, attempts, epochs_done, final_test_acc, final_val_acc, best_val_acc, selected_test_acc,
  selected_epoch, packed_bytes, packed_agreement, device, started_at, finished_at, error}``
- Metric: ``{epoch, train_loss, train_acc, val_acc, test_acc, test_top5, lr, epoch_seconds,
  images_per_s, weight_flips, device, schedule}``
- Leaderboard row: ``{dataset, model, w_bits, a_bits, estimator_label, metric, n, mean, std, ci_low,
  ci_high, rank, best, packed_bytes, packed_agreement}``

Every caller imports from here (``from service import store``); the submodules are the layout.
"""
from __future__ import annotations

from ..tables import METRIC_FIELDS
from .queue import cancel_requested, claim_run, finish_run, heartbeat, release_run, requeue_stale
from .records import (
    FINAL_COLUMNS,
    RUN_FIELDS,
    TRIAL_FIELDS,
    IdempotencyConflict,
    count_rows,
    create_run,
    estimator_label,
    get_run,
    get_trial,
    list_runs,
    list_trials,
    record_epoch,
    record_trial_end,
    record_trial_start,
    request_cancel,
    run_by_spec_hash,
    trial_ids,
    trial_metrics,
)
from .results import (
    DEFAULT_RANK_METRIC,
    FLOAT_BITS,
    FLOAT_LABEL,
    RANK_METRICS,
    datasets_models,
    export_rows,
    leaderboard,
    report_archive,
    results_fingerprint,
    run_results,
    save_report_archive,
)

__all__ = [
    "DEFAULT_RANK_METRIC", "FINAL_COLUMNS", "FLOAT_BITS", "FLOAT_LABEL", "METRIC_FIELDS", "RANK_METRICS", "RUN_FIELDS",
    "TRIAL_FIELDS", "IdempotencyConflict", "cancel_requested", "claim_run", "count_rows", "create_run",
    "datasets_models", "estimator_label", "export_rows", "finish_run", "get_run", "get_trial", "heartbeat",
    "leaderboard", "list_runs", "list_trials", "record_epoch", "record_trial_end", "record_trial_start",
    "release_run", "report_archive", "request_cancel", "requeue_stale", "results_fingerprint", "run_by_spec_hash",
    "run_results", "save_report_archive", "trial_ids", "trial_metrics",
]

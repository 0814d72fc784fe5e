"""The store: the one place that knows SQL.

Plain functions whose first argument is a ``Session``; they return plain JSON-ready dicts
(records, docs/CONTRACTS.md) with ISO-8601 UTC timestamps. Functions that write commit before
they return; readers leave the session's transaction to the caller. Split by capability:

- :mod:`.records` — runs, trials and their metrics: create, read, record a trial's progress, cancel.
- :mod:`.results` — what finished trials add up to: the leaderboard, a run's results and export,
  the data sets and models present, a run's report archive.
- :mod:`.queue` — the dispatcher's side: claim, heartbeat, finish, release and requeue runs.

The records are the ``TypedDict``s of :mod:`workers.records` (Run, Trial, Metric, LeaderboardRow;
a trial with its metrics, a finished trial with its ``final`` dict); statuses are its ``Status``.

Every caller imports from here (``from service import store``); the submodules are the layout.
"""
from __future__ import annotations

from workers.records import DEFAULT_RANK_METRIC

from .queue import cancel_requested, claim_run, finish_run, heartbeat, release_run, requeue_stale
from .records import (
    IdempotencyConflict,
    count_rows,
    create_run,
    get_run,
    get_trial,
    list_runs,
    list_trials,
    record_epoch,
    record_provenance,
    record_trial_end,
    record_trial_start,
    request_cancel,
    run_by_spec_hash,
    trial_ids,
    trial_metrics,
)
from .results import (
    datasets_models,
    export_rows,
    leaderboard,
    protocols,
    report_archive,
    results_fingerprint,
    run_results,
    save_report_archive,
)

__all__ = [
    "DEFAULT_RANK_METRIC", "IdempotencyConflict", "cancel_requested", "claim_run", "count_rows", "create_run",
    "datasets_models", "export_rows", "finish_run", "get_run", "get_trial", "heartbeat", "leaderboard", "list_runs",
    "list_trials", "protocols", "record_epoch", "record_provenance", "record_trial_end", "record_trial_start",
    "release_run", "report_archive",
    "request_cancel", "requeue_stale", "results_fingerprint", "run_by_spec_hash", "run_results", "save_report_archive",
    "trial_ids", "trial_metrics",
]

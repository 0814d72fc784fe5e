"""The store: the one place that knows SQL.

Plain functions whose first argument is a ``Session``; they return plain JSON-ready dicts
(records, docs/CONTRACTS.md) with ISO-8601 UTC timestamps. Functions that write commit before
they return; readers leave the session's transaction to the caller.

Records
- Run: ``{id, name, status, dataset, model, spec, spec_hash, created_at, started_at,
  finished_at, error, trial_count, cancel_requested, progress: {done, running, queued, failed,
  cancelled}}``
- Trial: ``{id, run_id, key, estimator, estimator_label, estimator_params, w_bits, a_bits, seed,
  status, attempts, epochs_done, final_test_acc, final_val_acc, best_val_acc, selected_test_acc,
  selected_epoch, packed_bytes, packed_agreement, device, provenance, started_at, finished_at, error}``
- Metric: ``{epoch, train_loss, train_acc, val_acc, test_acc, test_top5, lr, epoch_seconds,
  images_per_s, weight_flips, device, schedule}``
- Leaderboard row: ``{dataset, model, w_bits, a_bits, estimator_label, metric, n, mean, std, ci_low,
  ci_high, rank, best, packed_bytes, packed_agreement}``

A finished run's report is rendered once and kept in ``report_archives`` under the run's
``results_fingerprint`` (service.report).

The queue is the runs table: ``claim_run`` takes the oldest queued run (PostgreSQL:
``FOR UPDATE SKIP LOCKED``; SQLite: one guarded ``UPDATE … WHERE id = (oldest) AND
status = 'queued'``), the holder keeps ``heartbeat_at`` fresh, and ``requeue_stale`` puts the runs
of dead holders back in the queue (finished trials and stored epochs are kept).
"""
from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Iterable

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import public_reason
from .tables import FINISHED, METRIC_FIELDS, RUN_STATUSES, metrics, report_archives, runs, trials, utcnow

FLOAT_LABEL = "float"
FLOAT_BITS = 32
RUN_FIELDS = ("id", "name", "status", "dataset", "model", "spec", "spec_hash", "created_at", "started_at",
              "finished_at", "error", "trial_count", "cancel_requested")
TRIAL_FIELDS = ("id", "run_id", "key", "estimator", "estimator_label", "estimator_params", "w_bits", "a_bits",
                "seed", "status", "attempts", "epochs_done", "final_test_acc", "final_val_acc", "best_val_acc",
                "selected_test_acc", "selected_epoch", "packed_bytes", "packed_agreement", "device", "provenance",
                "started_at", "finished_at", "error")
FINAL_COLUMNS = ("final_test_acc", "final_val_acc", "best_val_acc", "selected_test_acc", "selected_epoch",
                 "packed_bytes", "packed_agreement")
INTEGER_FINAL_COLUMNS = ("selected_epoch", "packed_bytes")
#: what a leaderboard ranks by: the trained network's test accuracy (after the last epoch and the
#: recipe's end steps) or the test accuracy at the epoch with the best validation accuracy
RANK_METRICS = {"final": trials.c.final_test_acc, "selected": trials.c.selected_test_acc}
DEFAULT_RANK_METRIC = "final"


class IdempotencyConflict(Exception):
    """The idempotency key was already used for a different spec."""

    def __init__(self, key: str, run_id: int):
        super().__init__(f"idempotency key {key!r} was used for run {run_id} with a different spec")
        self.key = key
        self.run_id = run_id


# -- records ----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _record(row, fields: Iterable[str]) -> dict:
    m = row._mapping
    return {f: _plain(m[f]) for f in fields}


def _metric_record(row) -> dict:
    return _record(row, METRIC_FIELDS)


def _progress(s: Session, run_ids: list[int]) -> dict[int, dict[str, int]]:
    out = {rid: dict.fromkeys(RUN_STATUSES, 0) for rid in run_ids}
    if run_ids:
        q = (select(trials.c.run_id, trials.c.status, func.count())
             .where(trials.c.run_id.in_(run_ids)).group_by(trials.c.run_id, trials.c.status))
        for rid, status, n in s.execute(q):
            out[rid][status] = n
    return out


def _run_records(s: Session, rows) -> list[dict]:
    rows = list(rows)
    progress = _progress(s, [r.id for r in rows])
    return [{**_record(r, RUN_FIELDS), "progress": progress[r.id]} for r in rows]


def estimator_label(trial_key: str) -> str:
    """``aqe[backward=alg1]-w1a1-s0`` → ``aqe[backward=alg1]`` (the key's part before ``-w``)."""
    return trial_key.rsplit("-w", 1)[0]


def _dialect(s: Session) -> str:
    return s.get_bind().dialect.name


def _upsert_insert(s: Session, table):
    """``INSERT`` that supports ``on_conflict_do_nothing`` on this session's dialect."""
    return (postgresql if _dialect(s) == "postgresql" else sqlite).insert(table)


def _num(value) -> float | None:
    """A finite float, or None (NaN and ±inf are stored as NULL; numpy scalars become floats)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _jsonable(value):
    """Plain JSON: numpy scalars become Python numbers, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- runs -------------------------------------------------------------------------------------
def create_run(s: Session, spec, *, idempotency_key: str | None = None) -> tuple[dict, bool]:
    """Queue ``spec`` (an ``ExperimentSpec`` or a dict): the run and one trial row per grid cell,
    in one transaction. Returns ``(run, created)``. A repeated ``idempotency_key`` with the same
    spec returns the existing run with ``created=False``; with another spec it raises
    ``IdempotencyConflict``."""
    if isinstance(spec, (dict, str)):
        from workers.spec import parse_spec

        spec = parse_spec(spec)
    spec_hash = spec.spec_hash()
    if idempotency_key is not None:
        existing = _existing_for_key(s, idempotency_key, spec_hash)
        if existing is not None:
            return existing, False
    cells = spec.trials()
    try:
        run_id = s.execute(runs.insert().values(
            name=spec.name, status="queued", dataset=spec.dataset, model=spec.model,
            spec=spec.model_dump(mode="json"), spec_hash=spec_hash, idempotency_key=idempotency_key,
            created_at=utcnow(), trial_count=len(cells),
        ).returning(runs.c.id)).scalar_one()
        s.execute(trials.insert(), [
            {"run_id": run_id, "key": t.key, "estimator": t.estimator, "estimator_label": estimator_label(t.key),
             "estimator_params": dict(t.estimator_params), "w_bits": t.w_bits, "a_bits": t.a_bits,
             "seed": t.seed, "status": "queued", "attempts": 0, "epochs_done": 0}
            for t in cells
        ])
        s.commit()
    except IntegrityError:  # a concurrent request inserted the same idempotency key first
        s.rollback()
        existing = _existing_for_key(s, idempotency_key, spec_hash) if idempotency_key is not None else None
        if existing is None:
            raise
        return existing, False
    return get_run(s, run_id), True


def _existing_for_key(s: Session, key: str, spec_hash: str) -> dict | None:
    row = s.execute(select(runs.c.id, runs.c.spec_hash).where(runs.c.idempotency_key == key)).first()
    if row is None:
        return None
    if row.spec_hash != spec_hash:
        raise IdempotencyConflict(key, row.id)
    return get_run(s, row.id)


def get_run(s: Session, run_id: int) -> dict | None:
    """The Run record with its trials' progress, or None."""
    recs = _run_records(s, s.execute(select(runs).where(runs.c.id == run_id)))
    return recs[0] if recs else None


def list_runs(s: Session, *, status: str | None = None, dataset: str | None = None, model: str | None = None,
              limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    """Runs, newest first, filtered; returns ``(page, total matching)``."""
    conds = [col == value for col, value in ((runs.c.status, status), (runs.c.dataset, dataset),
                                             (runs.c.model, model)) if value is not None]
    total = s.execute(select(func.count()).select_from(runs).where(*conds)).scalar_one()
    page = s.execute(select(runs).where(*conds).order_by(runs.c.id.desc()).limit(limit).offset(offset))
    return _run_records(s, page), total


def request_cancel(s: Session, run_id: int) -> dict | None:
    """Cancel a run: a queued one is cancelled at once (with its trials), a running one gets
    ``cancel_requested`` (its dispatcher stops it); a finished one is left as it is. Returns the
    Run record, or None when there is no such run."""
    now = utcnow()
    s.execute(update(runs).where(runs.c.id == run_id, runs.c.status.in_(("queued", "running")))
              .values(cancel_requested=True))
    if s.execute(update(runs).where(runs.c.id == run_id, runs.c.status == "queued")
                 .values(status="cancelled", finished_at=now)).rowcount:
        _close_open_trials(s, [run_id], "cancelled", now)
    s.commit()
    return get_run(s, run_id)


def count_rows(s: Session) -> dict[str, int]:
    """``{"runs": n, "trials": n, "metrics": n}``."""
    return {t.name: s.execute(select(func.count()).select_from(t)).scalar_one() for t in (runs, trials, metrics)}


# -- trials and metrics -----------------------------------------------------------------------
def list_trials(s: Session, run_id: int) -> list[dict]:
    """The run's Trial records in grid order."""
    rows = s.execute(select(trials).where(trials.c.run_id == run_id).order_by(trials.c.id))
    return [_record(r, TRIAL_FIELDS) for r in rows]


def get_trial(s: Session, trial_id: int) -> dict | None:
    """The Trial record plus ``"metrics"``: its Metric records by epoch; None when missing."""
    row = s.execute(select(trials).where(trials.c.id == trial_id)).first()
    if row is None:
        return None
    return {**_record(row, TRIAL_FIELDS), "metrics": trial_metrics(s, trial_id)}


def trial_metrics(s: Session, trial_id: int) -> list[dict]:
    """The trial's Metric records by epoch."""
    rows = s.execute(select(metrics).where(metrics.c.trial_id == trial_id).order_by(metrics.c.epoch))
    return [_metric_record(r) for r in rows]


def run_results(s: Session, run_id: int) -> list[dict]:
    """The run's finished (``done``) trials as Trial records plus ``"final"`` (the trainer's
    final dict), in grid order: the input of the accuracy-versus-bits figures."""
    rows = s.execute(select(trials).where(trials.c.run_id == run_id, trials.c.status == "done")
                     .order_by(trials.c.id))
    return [{**_record(r, TRIAL_FIELDS), "final": r.final or {}} for r in rows]


def export_rows(s: Session, run_id: int) -> list[dict]:
    """One flat row per (trial, epoch) of the run: the trial's identity, then the epoch's
    metrics; schedule values become ``schedule.<name>`` columns."""
    q = (select(trials.c.key.label("trial_key"), trials.c.estimator, trials.c.estimator_label, trials.c.w_bits,
                trials.c.a_bits, trials.c.seed, *[metrics.c[f] for f in METRIC_FIELDS])
         .join(metrics, metrics.c.trial_id == trials.c.id)
         .where(trials.c.run_id == run_id).order_by(trials.c.id, metrics.c.epoch))
    out = []
    for row in s.execute(q):
        rec = dict(row._mapping)
        schedule = rec.pop("schedule") or {}
        out.append({"run_id": run_id, **rec, **{f"schedule.{k}": v for k, v in schedule.items()}})
    return out


def trial_ids(s: Session, run_id: int) -> dict[str, int]:
    """``{trial key: trial id}`` for the run (the sink's lookup)."""
    return dict(s.execute(select(trials.c.key, trials.c.id).where(trials.c.run_id == run_id)).all())


def record_trial_start(s: Session, trial_id: int, *, device: str | None = None) -> None:
    """A trial (re)starts: running, one more attempt, its device; ``started_at`` keeps the first start."""
    s.execute(update(trials).where(trials.c.id == trial_id).values(
        status="running", attempts=trials.c.attempts + 1, device=device,
        started_at=func.coalesce(trials.c.started_at, utcnow()), finished_at=None, error=None))
    s.commit()


def record_provenance(s: Session, trial_id: int, provenance: dict) -> None:
    """Keep the latest attempt's provenance (``workers.provenance``) and its actual device; commits."""
    s.execute(update(trials).where(trials.c.id == trial_id).values(
        provenance=_jsonable(provenance), device=provenance.get("device")))
    s.commit()


def record_epoch(s: Session, trial_id: int, metric: dict) -> bool:
    """Store one epoch's metrics exactly once per (trial, epoch) and advance ``epochs_done``;
    commits. Returns False when that epoch was already stored (the row is left unchanged)."""
    epoch = int(metric["epoch"])
    values = {f: _num(metric.get(f)) for f in METRIC_FIELDS if f not in ("epoch", "device", "schedule")}
    stmt = _upsert_insert(s, metrics).values(
        trial_id=trial_id, epoch=epoch, device=metric.get("device"),
        schedule=_jsonable(metric.get("schedule") or {}), **values,
    ).on_conflict_do_nothing(index_elements=["trial_id", "epoch"])
    inserted = s.execute(stmt).rowcount == 1
    s.execute(update(trials).where(trials.c.id == trial_id).values(
        epochs_done=case((trials.c.epochs_done < epoch, epoch), else_=trials.c.epochs_done),
        status=case((trials.c.status == "queued", "running"), else_=trials.c.status)))
    s.commit()
    return inserted


def record_trial_end(s: Session, trial_id: int, status: str, final: dict | None = None,
                     error: str | None = None) -> None:
    """A trial ends (``done``, ``failed`` or ``cancelled``): status, final metrics, error (kept as
    :func:`service.errors.public_reason`: type and message, relative paths, no traceback)."""
    if status not in FINISHED:
        raise ValueError(f"a trial ends as one of {FINISHED}, not {status!r}")
    final = _jsonable(final) if final else None
    values = {"status": status, "finished_at": utcnow(), "error": public_reason(error), "final": final}
    if final:
        values.update({c: _num(final.get(c)) for c in FINAL_COLUMNS})
        for c in INTEGER_FINAL_COLUMNS:
            if values[c] is not None:
                values[c] = int(values[c])
    s.execute(update(trials).where(trials.c.id == trial_id).values(**values))
    s.commit()


def _close_open_trials(s: Session, run_ids: list[int], status: str, now: datetime) -> None:
    s.execute(update(trials).where(trials.c.run_id.in_(run_ids), trials.c.status.in_(("queued", "running")))
              .values(status=status, finished_at=now))


# -- report archives --------------------------------------------------------------------------
def results_fingerprint(s: Session, run_id: int) -> tuple[str, str] | None:
    """``(status, SHA-256 hex)`` of what a run's report is drawn from, None for an unknown run.

    The digest covers the run's row (name, spec, status, times, error), its trials per status
    (count, epochs, sums of the final accuracies, latest start and finish) and its metric rows
    (count, highest id): three indexed aggregate queries. Any write a report could show
    changes it; a finished run's never changes unless its rows are edited.
    """
    run = s.execute(select(runs.c.name, runs.c.spec_hash, runs.c.status, runs.c.created_at, runs.c.started_at,
                           runs.c.finished_at, runs.c.error, runs.c.trial_count).where(runs.c.id == run_id)).first()
    if run is None:
        return None
    by_status = s.execute(
        select(trials.c.status, func.count(), func.sum(trials.c.epochs_done), func.sum(trials.c.final_test_acc),
               func.sum(trials.c.final_val_acc), func.max(trials.c.started_at), func.max(trials.c.finished_at))
        .where(trials.c.run_id == run_id).group_by(trials.c.status).order_by(trials.c.status)).all()
    epochs = s.execute(select(func.count(metrics.c.id), func.max(metrics.c.id))
                       .join(trials, trials.c.id == metrics.c.trial_id).where(trials.c.run_id == run_id)).one()
    state = json.dumps([list(run), [list(r) for r in by_status], list(epochs)], default=str)
    return run.status, hashlib.sha256(state.encode()).hexdigest()


def report_archive(s: Session, run_id: int, png: bool, fingerprint: str) -> bytes | None:
    """The stored report archive of the run, if it was built from ``fingerprint``."""
    return s.execute(select(report_archives.c.body).where(
        report_archives.c.run_id == run_id, report_archives.c.png == png,
        report_archives.c.fingerprint == fingerprint)).scalar()


def save_report_archive(s: Session, run_id: int, png: bool, fingerprint: str, body: bytes) -> None:
    """Keep ``body`` as the run's report archive (replacing an older one); commits."""
    values = {"fingerprint": fingerprint, "body": body, "created_at": utcnow()}
    s.execute(_upsert_insert(s, report_archives).values(run_id=run_id, png=png, **values)
              .on_conflict_do_update(index_elements=["run_id", "png"], set_=values))
    s.commit()


# -- leaderboard ------------------------------------------------------------------------------
@lru_cache(maxsize=1024)
def _t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (two-sided 95%)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, dof))


def leaderboard(s: Session, *, dataset: str | None = None, model: str | None = None,
                run_id: int | None = None, metric: str = DEFAULT_RANK_METRIC) -> list[dict]:
    """Estimators ranked by mean test accuracy over seeds, per dataset × model × bits.

    ``metric`` (:data:`RANK_METRICS`): ``final``, the trained network's test accuracy, or
    ``selected``, the test accuracy at the epoch with the best validation accuracy; each row
    says which.

    Count, mean and spread are aggregated in SQL over ``done`` trials (with the mean packed
    export size and the lowest packed-engine agreement, where trials have them); the 95% interval is
    ``mean ± t(0.975, n−1)·std/√n`` clipped to [0, 1] (sample std; None when n < 2) and rank 1 is the best
    mean within its (dataset, model, w_bits, a_bits) (ties share a rank; ``best`` marks rank 1).
    Rows come ordered by dataset, model, then w_bits + a_bits (the float reference last),
    w_bits, a_bits, rank. ``run_id`` restricts it to one run (a study's report)."""
    if metric not in RANK_METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(RANK_METRICS)}")
    x = RANK_METRICS[metric]
    keys = (runs.c.dataset, runs.c.model, trials.c.w_bits, trials.c.a_bits, trials.c.estimator_label)
    spread = (func.stddev_samp(x) if _dialect(s) == "postgresql" else func.avg(x * x)).label("spread")
    packed = (func.avg(trials.c.packed_bytes).label("packed_bytes"),
              func.min(trials.c.packed_agreement).label("packed_agreement"))
    q = (select(*keys, func.count(x).label("n"), func.avg(x).label("mean"), spread, *packed)
         .select_from(trials.join(runs, runs.c.id == trials.c.run_id))
         .where(trials.c.status == "done", x.isnot(None),
                *([runs.c.dataset == dataset] if dataset is not None else []),
                *([runs.c.model == model] if model is not None else []),
                *([runs.c.id == run_id] if run_id is not None else []))
         .group_by(*keys))
    rows = []
    for r in s.execute(q):
        n, mean = int(r.n), float(r.mean)
        std = ci_low = ci_high = None
        if n >= 2:
            if _dialect(s) == "postgresql":
                std = float(r.spread)
            else:  # E[x²] − E[x]², made unbiased
                std = math.sqrt(max(float(r.spread) - mean * mean, 0.0) * n / (n - 1))
            half = _t975(n - 1) * std / math.sqrt(n)
            ci_low, ci_high = max(mean - half, 0.0), min(mean + half, 1.0)  # an accuracy stays in [0, 1]
        rows.append({"dataset": r.dataset, "model": r.model, "w_bits": r.w_bits, "a_bits": r.a_bits,
                     "estimator_label": r.estimator_label, "metric": metric, "n": n, "mean": mean, "std": std,
                     "ci_low": ci_low, "ci_high": ci_high,
                     "packed_bytes": None if r.packed_bytes is None else int(round(float(r.packed_bytes))),
                     "packed_agreement": None if r.packed_agreement is None else float(r.packed_agreement)})
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"], row["w_bits"], row["a_bits"]), []).append(row)
    for group in groups.values():
        group.sort(key=lambda g: -g["mean"])
        for i, row in enumerate(group):
            same = i and row["mean"] == group[i - 1]["mean"]
            row["rank"] = group[i - 1]["rank"] if same else i + 1
            row["best"] = row["rank"] == 1

    def order(row):
        w, a = row["w_bits"], row["a_bits"]
        return (row["dataset"], row["model"], w == a == FLOAT_BITS, w + a, w, a, row["rank"], row["estimator_label"])

    return sorted(rows, key=order)


# -- the queue (dispatcher side) --------------------------------------------------------------
def claim_run(s: Session, worker_id: str, *, stale_s: float | None = None) -> dict | None:
    """Atomically take the oldest queued run for ``worker_id`` (status running, heartbeat now);
    None when the queue is empty. With ``stale_s``, runs of dead holders are requeued first.
    Several dispatchers never get the same run."""
    if stale_s is not None:
        requeue_stale(s, stale_s)
    now = utcnow()
    oldest = (select(runs.c.id).where(runs.c.status == "queued")
              .order_by(runs.c.created_at, runs.c.id).limit(1))
    if _dialect(s) == "postgresql":  # lock the row; concurrent claimers skip to the next one
        run_id = s.execute(oldest.with_for_update(skip_locked=True)).scalar()
        if run_id is None:
            s.rollback()
            return None
        target = runs.c.id == run_id
    else:  # SQLite: one statement under the database's write lock
        target = runs.c.id == oldest.scalar_subquery()
    claimed = s.execute(update(runs).where(target, runs.c.status == "queued").values(
        status="running", worker_id=worker_id, heartbeat_at=now,
        started_at=func.coalesce(runs.c.started_at, now), finished_at=None, error=None,
    ).returning(runs.c.id)).scalar()
    s.commit()
    return get_run(s, claimed) if claimed is not None else None


def heartbeat(s: Session, run_id: int, worker_id: str) -> bool:
    """Refresh the claim; False when ``worker_id`` no longer holds the running run."""
    ok = s.execute(update(runs).where(runs.c.id == run_id, runs.c.worker_id == worker_id,
                                      runs.c.status == "running").values(heartbeat_at=utcnow())).rowcount == 1
    s.commit()
    return ok


def cancel_requested(s: Session, run_id: int) -> bool:
    """Whether the run should stop: a cancel was requested, or it is cancelled already."""
    row = s.execute(select(runs.c.cancel_requested, runs.c.status).where(runs.c.id == run_id)).first()
    return row is not None and (bool(row.cancel_requested) or row.status == "cancelled")


def finish_run(s: Session, run_id: int, status: str, error: str | None = None, *,
               worker_id: str | None = None) -> bool:
    """End a queued or running run as ``done``, ``failed`` or ``cancelled`` (with ``error``, kept as
    :func:`service.errors.public_reason`); trials still queued or running become ``cancelled``.
    With ``worker_id``, only while that worker holds it. Returns whether the run was changed."""
    if status not in FINISHED:
        raise ValueError(f"a run finishes as one of {FINISHED}, not {status!r}")
    now = utcnow()
    conds = [runs.c.id == run_id, runs.c.status.in_(("queued", "running"))]
    if worker_id is not None:
        conds.append(runs.c.worker_id == worker_id)
    changed = s.execute(update(runs).where(*conds).values(status=status, error=public_reason(error),
                                                          finished_at=now)).rowcount == 1
    if changed:
        _close_open_trials(s, [run_id], "cancelled", now)
    s.commit()
    return changed


def requeue_stale(s: Session, stale_s: float) -> list[int]:
    """Put running runs whose heartbeat is older than ``stale_s`` seconds back in the queue;
    their running and stopped (cancelled) trials become queued, done and failed trials and
    stored epochs stay. A stale run with a pending cancel is cancelled instead. Returns the
    requeued run ids."""
    cutoff = utcnow() - timedelta(seconds=stale_s)
    stale = and_(runs.c.status == "running", or_(runs.c.heartbeat_at.is_(None), runs.c.heartbeat_at < cutoff))
    ids = s.execute(select(runs.c.id).where(stale).with_for_update(skip_locked=True)).scalars().all()
    if not ids:
        s.rollback()
        return []
    return _unclaim(s, and_(runs.c.id.in_(ids), stale))


def release_run(s: Session, run_id: int, worker_id: str) -> bool:
    """Give a held run back to the queue at once (a dispatcher shutting down cleanly); like
    ``requeue_stale`` for one run. Returns whether it was requeued."""
    return bool(_unclaim(s, and_(runs.c.id == run_id, runs.c.worker_id == worker_id, runs.c.status == "running")))


def _unclaim(s: Session, where) -> list[int]:
    now = utcnow()
    rows = s.execute(update(runs).where(where).values(
        status=case((runs.c.cancel_requested, "cancelled"), else_="queued"),
        finished_at=case((runs.c.cancel_requested, now), else_=None),
        worker_id=None, heartbeat_at=None,
    ).returning(runs.c.id, runs.c.status)).all()
    requeued = [r.id for r in rows if r.status == "queued"]
    if requeued:
        # cancelled here = stopped when the holder shut down (run_sweep's stop), not by a user
        s.execute(update(trials).where(trials.c.run_id.in_(requeued), trials.c.status.in_(("running", "cancelled")))
                  .values(status="queued", finished_at=None))
    cancelled = [r.id for r in rows if r.status == "cancelled"]
    if cancelled:
        _close_open_trials(s, cancelled, "cancelled", now)
    s.commit()
    return requeued

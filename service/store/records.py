"""Runs, trials and their metrics: queue a spec, read runs and trials, record a trial's progress, cancel."""
from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from workers.protocol import protocol
from workers.records import (
    ACTIVE,
    FINISHED,
    METRIC_KEYS,
    RUN_KEYS,
    STATUSES,
    TRIAL_KEYS,
    Metric,
    Run,
    Status,
    Trial,
    TrialWithMetrics,
)

from ..errors import public_reason
from ..tables import metrics, runs, trials, utcnow
from .sql import jsonable, num, record, rowcount, upsert_insert

FINAL_COLUMNS = ("final_test_acc", "final_val_acc", "best_val_acc", "selected_test_acc", "selected_epoch",
                 "packed_bytes", "packed_agreement")
INTEGER_FINAL_COLUMNS = ("selected_epoch", "packed_bytes")


class IdempotencyConflict(Exception):
    """The idempotency key was already used for a different spec."""

    def __init__(self, key: str, run_id: int):
        super().__init__(f"idempotency key {key!r} was used for run {run_id} with a different spec")
        self.key = key
        self.run_id = run_id


def _progress(s: Session, run_ids: list[int]) -> dict[int, dict[str, int]]:
    out = {rid: dict.fromkeys(STATUSES, 0) for rid in run_ids}
    if run_ids:
        q = (select(trials.c.run_id, trials.c.status, func.count())
             .where(trials.c.run_id.in_(run_ids)).group_by(trials.c.run_id, trials.c.status))
        for rid, status, n in s.execute(q):
            out[rid][status] = n
    return out


def _run_records(s: Session, rows) -> list[Run]:
    rows = list(rows)
    progress = _progress(s, [r.id for r in rows])
    return [cast(Run, {**record(r, RUN_KEYS), "progress": progress[r.id]}) for r in rows]


# -- runs -------------------------------------------------------------------------------------
def create_run(s: Session, spec, *, idempotency_key: str | None = None) -> tuple[Run, bool]:
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
    stored, view = spec.model_dump(mode="json"), spec.protocol_view()
    of_spec = protocol(view)
    # a named method's trial with its own first/last-layer policy has a protocol of its own
    own = {p: protocol(view, first_last_float=p) for p in {t.first_last_float for t in cells} - {None}}
    try:
        run_id = s.execute(runs.insert().values(
            name=spec.name, status=Status.QUEUED, dataset=spec.dataset, model=spec.model,
            spec=stored, spec_hash=spec_hash, idempotency_key=idempotency_key,
            created_at=utcnow(), trial_count=len(cells), protocol=of_spec.id, protocol_label=of_spec.label,
        ).returning(runs.c.id)).scalar_one()
        s.execute(trials.insert(), [
            {"run_id": run_id, "key": t.key, "estimator": t.estimator, "estimator_label": t.label,
             "estimator_params": dict(t.estimator_params), "w_bits": t.w_bits, "a_bits": t.a_bits,
             "seed": t.seed, "status": Status.QUEUED, "attempts": 0, "epochs_done": 0,
             "protocol": (p := own.get(t.first_last_float, of_spec)).id, "protocol_label": p.label, "grid": t.grid}
            for t in cells
        ])
        s.commit()
    except IntegrityError:  # a concurrent request inserted the same idempotency key first
        s.rollback()
        existing = _existing_for_key(s, idempotency_key, spec_hash) if idempotency_key is not None else None
        if existing is None:
            raise
        return existing, False
    return cast(Run, get_run(s, run_id)), True


def _existing_for_key(s: Session, key: str, spec_hash: str) -> Run | None:
    row = s.execute(select(runs.c.id, runs.c.spec_hash).where(runs.c.idempotency_key == key)).first()
    if row is None:
        return None
    if row.spec_hash != spec_hash:
        raise IdempotencyConflict(key, row.id)
    return get_run(s, row.id)


def get_run(s: Session, run_id: int) -> Run | None:
    """The Run record with its trials' progress, or None."""
    recs = _run_records(s, s.execute(select(runs).where(runs.c.id == run_id)))
    return recs[0] if recs else None


def run_by_spec_hash(s: Session, spec_hash: str) -> Run | None:
    """The newest Run record whose spec has this hash (``ExperimentSpec.spec_hash``), or None."""
    recs = _run_records(s, s.execute(select(runs).where(runs.c.spec_hash == spec_hash)
                                     .order_by(runs.c.id.desc()).limit(1)))
    return recs[0] if recs else None


def list_runs(s: Session, *, status: str | None = None, dataset: str | None = None, model: str | None = None,
              limit: int = 50, offset: int = 0) -> tuple[list[Run], int]:
    """Runs, newest first, filtered; returns ``(page, total matching)``."""
    conds = [col == value for col, value in ((runs.c.status, status), (runs.c.dataset, dataset),
                                             (runs.c.model, model)) if value is not None]
    total = s.execute(select(func.count()).select_from(runs).where(*conds)).scalar_one()
    page = s.execute(select(runs).where(*conds).order_by(runs.c.id.desc()).limit(limit).offset(offset))
    return _run_records(s, page), total


def request_cancel(s: Session, run_id: int) -> Run | None:
    """Cancel a run: a queued one is cancelled at once (with its trials), a running one gets
    ``cancel_requested`` (its dispatcher stops it); a finished one is left as it is. Returns the
    Run record, or None when there is no such run."""
    now = utcnow()
    s.execute(update(runs).where(runs.c.id == run_id, runs.c.status.in_(ACTIVE)).values(cancel_requested=True))
    if rowcount(s, update(runs).where(runs.c.id == run_id, runs.c.status == Status.QUEUED)
                .values(status=Status.CANCELLED, finished_at=now)):
        close_open_trials(s, [run_id], Status.CANCELLED, now)
    s.commit()
    return get_run(s, run_id)


def count_rows(s: Session) -> dict[str, int]:
    """``{"runs": n, "trials": n, "metrics": n}``."""
    return {t.name: s.execute(select(func.count()).select_from(t)).scalar_one() for t in (runs, trials, metrics)}


# -- trials and metrics -----------------------------------------------------------------------
def list_trials(s: Session, run_id: int, *, limit: int | None = None, offset: int = 0) -> list[Trial]:
    """The run's Trial records in grid order; ``limit``/``offset`` take one page of them."""
    q = select(trials).where(trials.c.run_id == run_id).order_by(trials.c.id)
    rows = s.execute(q.limit(limit).offset(offset) if limit is not None else q)
    return [cast(Trial, record(r, TRIAL_KEYS)) for r in rows]


def get_trial(s: Session, trial_id: int) -> TrialWithMetrics | None:
    """The Trial record plus ``"metrics"``: its Metric records by epoch; None when missing."""
    row = s.execute(select(trials).where(trials.c.id == trial_id)).first()
    if row is None:
        return None
    return cast(TrialWithMetrics, {**record(row, TRIAL_KEYS), "metrics": trial_metrics(s, trial_id)})


def trial_metrics(s: Session, trial_id: int) -> list[Metric]:
    """The trial's Metric records by epoch."""
    rows = s.execute(select(metrics).where(metrics.c.trial_id == trial_id).order_by(metrics.c.epoch))
    return [cast(Metric, record(r, METRIC_KEYS)) for r in rows]


def trial_ids(s: Session, run_id: int) -> dict[str, int]:
    """``{trial key: trial id}`` for the run (the sink's lookup)."""
    return dict(s.execute(select(trials.c.key, trials.c.id).where(trials.c.run_id == run_id)).all())


def record_trial_start(s: Session, trial_id: int, *, device: str | None = None) -> None:
    """A trial (re)starts: running, one more attempt, its device; ``started_at`` keeps the first start."""
    s.execute(update(trials).where(trials.c.id == trial_id).values(
        status=Status.RUNNING, attempts=trials.c.attempts + 1, device=device,
        started_at=func.coalesce(trials.c.started_at, utcnow()), finished_at=None, error=None))
    s.commit()


def record_provenance(s: Session, trial_id: int, provenance: dict) -> None:
    """Keep the latest attempt's provenance (``workers.provenance``) and its actual device; commits."""
    s.execute(update(trials).where(trials.c.id == trial_id).values(
        provenance=jsonable(provenance), device=provenance.get("device")))
    s.commit()


def record_epoch(s: Session, trial_id: int, metric: dict) -> bool:
    """Store one epoch's metrics exactly once per (trial, epoch) and advance ``epochs_done``;
    commits. Returns False when that epoch was already stored (the row is left unchanged)."""
    epoch = int(metric["epoch"])
    values = {f: num(metric.get(f)) for f in METRIC_KEYS if f not in ("epoch", "device", "schedule")}
    stmt = upsert_insert(s, metrics).values(
        trial_id=trial_id, epoch=epoch, device=metric.get("device"),
        schedule=jsonable(metric.get("schedule") or {}), **values,
    ).on_conflict_do_nothing(index_elements=["trial_id", "epoch"])
    inserted = s.execute(stmt.returning(metrics.c.id)).first() is not None  # (rowcount is -1 on PostgreSQL)
    s.execute(update(trials).where(trials.c.id == trial_id).values(
        epochs_done=case((trials.c.epochs_done < epoch, epoch), else_=trials.c.epochs_done),
        status=case((trials.c.status == Status.QUEUED, Status.RUNNING), else_=trials.c.status)))
    s.commit()
    return inserted


def record_trial_end(s: Session, trial_id: int, status: str, final: dict | None = None,
                     error: str | None = None) -> None:
    """A trial ends (``done``, ``failed`` or ``cancelled``): status, final metrics, error (kept as
    :func:`service.errors.public_reason`: type and message, relative paths, no traceback)."""
    if status not in FINISHED:
        raise ValueError(f"a trial ends as one of {FINISHED}, not {status!r}")
    final = jsonable(final) if final else None
    values = {"status": status, "finished_at": utcnow(), "error": public_reason(error), "final": final}
    if final:
        values.update({c: num(final.get(c)) for c in FINAL_COLUMNS})
        for c in INTEGER_FINAL_COLUMNS:
            if values[c] is not None:
                values[c] = int(values[c])  # type: ignore[arg-type]  # num() gave a number
    s.execute(update(trials).where(trials.c.id == trial_id).values(**values))
    s.commit()


def close_open_trials(s: Session, run_ids: list[int], status: str, now: datetime) -> None:
    """The runs' queued and running trials end as ``status`` at ``now`` (no commit)."""
    s.execute(update(trials).where(trials.c.run_id.in_(run_ids), trials.c.status.in_(ACTIVE))
              .values(status=status, finished_at=now))

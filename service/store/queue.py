"""The queue (the dispatcher's side): the runs table is the queue.

``claim_run`` takes the oldest queued run (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite: one
guarded ``UPDATE … WHERE id = (oldest) AND status = 'queued'``), the holder keeps ``heartbeat_at``
fresh, and ``requeue_stale`` puts the runs of dead holders back in the queue (finished trials and
stored epochs are kept).
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from workers.records import ACTIVE, FINISHED, Run, Status

from ..errors import public_reason
from ..tables import runs, trials, utcnow
from .records import close_open_trials, get_run
from .sql import dialect, rowcount


def claim_run(s: Session, worker_id: str, *, stale_s: float | None = None) -> Run | None:
    """Atomically take the oldest queued run for ``worker_id`` (status running, heartbeat now);
    None when the queue is empty. With ``stale_s``, runs of dead holders are requeued first.
    Several dispatchers never get the same run."""
    if stale_s is not None:
        requeue_stale(s, stale_s)
    now = utcnow()
    oldest = (select(runs.c.id).where(runs.c.status == Status.QUEUED)
              .order_by(runs.c.created_at, runs.c.id).limit(1))
    if dialect(s) == "postgresql":  # lock the row; concurrent claimers skip to the next one
        run_id = s.execute(oldest.with_for_update(skip_locked=True)).scalar()
        if run_id is None:
            s.rollback()
            return None
        target = runs.c.id == run_id
    else:  # SQLite: one statement under the database's write lock
        target = runs.c.id == oldest.scalar_subquery()
    claimed = s.execute(update(runs).where(target, runs.c.status == Status.QUEUED).values(
        status=Status.RUNNING, worker_id=worker_id, heartbeat_at=now,
        started_at=func.coalesce(runs.c.started_at, now), finished_at=None, error=None,
    ).returning(runs.c.id)).scalar()
    s.commit()
    return get_run(s, claimed) if claimed is not None else None


def heartbeat(s: Session, run_id: int, worker_id: str) -> bool:
    """Refresh the claim; False when ``worker_id`` no longer holds the running run."""
    ok = rowcount(s, update(runs).where(runs.c.id == run_id, runs.c.worker_id == worker_id,
                                        runs.c.status == Status.RUNNING).values(heartbeat_at=utcnow())) == 1
    s.commit()
    return ok


def cancel_requested(s: Session, run_id: int) -> bool:
    """Whether the run should stop: a cancel was requested, or it is cancelled already."""
    row = s.execute(select(runs.c.cancel_requested, runs.c.status).where(runs.c.id == run_id)).first()
    return row is not None and (bool(row.cancel_requested) or row.status == Status.CANCELLED)


def finish_run(s: Session, run_id: int, status: str, error: str | None = None, *,
               worker_id: str | None = None) -> bool:
    """End a queued or running run as ``done``, ``failed`` or ``cancelled`` (with ``error``, kept as
    :func:`service.errors.public_reason`); trials still queued or running become ``cancelled``.
    With ``worker_id``, only while that worker holds it. Returns whether the run was changed."""
    if status not in FINISHED:
        raise ValueError(f"a run finishes as one of {FINISHED}, not {status!r}")
    now = utcnow()
    conds = [runs.c.id == run_id, runs.c.status.in_(ACTIVE)]
    if worker_id is not None:
        conds.append(runs.c.worker_id == worker_id)
    changed = rowcount(s, update(runs).where(*conds).values(status=status, error=public_reason(error),
                                                            finished_at=now)) == 1
    if changed:
        close_open_trials(s, [run_id], Status.CANCELLED, now)
    s.commit()
    return changed


def requeue_stale(s: Session, stale_s: float) -> list[int]:
    """Put running runs whose heartbeat is older than ``stale_s`` seconds back in the queue;
    their running and stopped (cancelled) trials become queued, done and failed trials and
    stored epochs stay. A stale run with a pending cancel is cancelled instead. Returns the
    requeued run ids."""
    cutoff = utcnow() - timedelta(seconds=stale_s)
    stale = and_(runs.c.status == Status.RUNNING, or_(runs.c.heartbeat_at.is_(None), runs.c.heartbeat_at < cutoff))
    ids = s.execute(select(runs.c.id).where(stale).with_for_update(skip_locked=True)).scalars().all()
    if not ids:
        s.rollback()
        return []
    return _unclaim(s, and_(runs.c.id.in_(ids), stale))


def release_run(s: Session, run_id: int, worker_id: str) -> bool:
    """Give a held run back to the queue at once (a dispatcher shutting down cleanly); like
    ``requeue_stale`` for one run. Returns whether it was requeued."""
    return bool(_unclaim(s, and_(runs.c.id == run_id, runs.c.worker_id == worker_id, runs.c.status == Status.RUNNING)))


def _unclaim(s: Session, where) -> list[int]:
    now = utcnow()
    rows = s.execute(update(runs).where(where).values(
        status=case((runs.c.cancel_requested, Status.CANCELLED), else_=Status.QUEUED),
        finished_at=case((runs.c.cancel_requested, now), else_=None),
        worker_id=None, heartbeat_at=None,
    ).returning(runs.c.id, runs.c.status)).all()
    requeued = [r.id for r in rows if r.status == Status.QUEUED]
    if requeued:
        # cancelled here = stopped when the holder shut down (run_sweep's stop), not by a user
        stopped = trials.c.status.in_((Status.RUNNING, Status.CANCELLED))
        s.execute(update(trials).where(trials.c.run_id.in_(requeued), stopped).values(status=Status.QUEUED,
                                                                                         finished_at=None))
    cancelled = [r.id for r in rows if r.status == Status.CANCELLED]
    if cancelled:
        close_open_trials(s, cancelled, Status.CANCELLED, now)
    s.commit()
    return requeued

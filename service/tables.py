"""The schema: runs (the queue), trials (one per grid cell), metrics (one per trial and epoch),
report_archives (a finished run's zipped report, built once).

SQLAlchemy Core tables; Alembic (``service/migrations``) creates them. Types work on SQLite and
PostgreSQL alike: JSON (JSONB on PostgreSQL), timezone-aware UTC timestamps (``UTCDateTime``).
"""
from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator

from workers.records import FINISHED as FINISHED  # re-exported for older callers
from workers.records import STATUSES, Status

# Row ids are SQL INTEGER, a 4-byte int4 on PostgreSQL: no row has an id outside 1 … MAX_ID, and
# binding a larger number fails in the driver (PostgreSQL: integer out of range; SQLite: over 2^63).
MAX_ID = 2**31 - 1

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp that is always timezone-aware UTC in Python (SQLite stores it naive, in UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Json = JSON().with_variant(JSONB(), "postgresql")
# SQLite autoincrements only an INTEGER PRIMARY KEY (the rowid)
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _status_check(name: str) -> CheckConstraint:
    return CheckConstraint(f"{name} IN ({', '.join(repr(s) for s in STATUSES)})", name=name)


runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("status", String(16), nullable=False, server_default=Status.QUEUED.value),
    Column("dataset", String(64), nullable=False),
    Column("model", String(64), nullable=False),
    Column("spec", Json, nullable=False),
    Column("spec_hash", String(64), nullable=False),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("cancel_requested", Boolean, nullable=False, server_default=false()),
    Column("worker_id", String(200), nullable=True),
    Column("heartbeat_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("error", Text, nullable=True),
    Column("trial_count", Integer, nullable=False),
    # the run's protocol (workers.protocol: its spec's, with the spec's first_last_float) and its label
    Column("protocol", String(16), nullable=False),
    Column("protocol_label", String(300), nullable=False),
    _status_check("status"),
    Index(None, "status", "created_at", "id"),  # the queue: oldest queued first; listing by status
    Index(None, "dataset", "model"),
    Index(None, "protocol"),
)

trials = Table(
    "trials", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("key", String(300), nullable=False),
    Column("estimator", String(64), nullable=False),
    Column("estimator_label", String(300), nullable=False),
    Column("estimator_params", Json, nullable=False),
    Column("w_bits", Integer, nullable=False),
    Column("a_bits", Integer, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("status", String(16), nullable=False, server_default=Status.QUEUED.value),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("epochs_done", Integer, nullable=False, server_default="0"),
    Column("final_test_acc", Float, nullable=True),
    Column("final_val_acc", Float, nullable=True),
    Column("best_val_acc", Float, nullable=True),
    Column("selected_test_acc", Float, nullable=True),  # test accuracy at the best validation epoch
    Column("selected_epoch", Integer, nullable=True),
    Column("packed_bytes", BigInteger, nullable=True),  # size of the bit-packed XNOR/SHIFT export
    Column("packed_agreement", Float, nullable=True),  # its predictions = torch eval's, fraction
    Column("final", Json, nullable=True),
    Column("device", String(64), nullable=True),
    Column("provenance", Json, nullable=True),  # the latest attempt's workers.provenance record
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("error", Text, nullable=True),
    # the trial's protocol: its run's, but where a named method's first/last-layer policy differs
    Column("protocol", String(16), nullable=False),
    Column("protocol_label", String(300), nullable=False),
    Column("grid", String(32), nullable=True),  # the quantizer grid (estimators.grids); None for float
    UniqueConstraint("run_id", "key"),  # also the index for a run's trials
    _status_check("status"),
    Index(None, "w_bits", "a_bits"),
    Index(None, "status"),
)
# the leaderboard: one trial per (protocol, estimator label, bits, seed), the latest finished (in its order)
Index("ix_trials_leaderboard", trials.c.protocol, trials.c.estimator_label, trials.c.w_bits, trials.c.a_bits,
      trials.c.seed, trials.c.finished_at.desc(), trials.c.id.desc())

metrics = Table(
    "metrics", metadata,
    Column("id", BigId, primary_key=True),
    Column("trial_id", Integer, ForeignKey("trials.id", ondelete="CASCADE"), nullable=False),
    Column("epoch", Integer, nullable=False),
    Column("train_loss", Float, nullable=True),
    Column("train_acc", Float, nullable=True),
    Column("val_acc", Float, nullable=True),
    Column("val_acc_soft", Float, nullable=True),  # the training forward's (AQE's soft mix); None where it is eval's
    Column("test_acc", Float, nullable=True),
    Column("test_top5", Float, nullable=True),  # label among the 5 largest logits (None with < 6 classes)
    Column("lr", Float, nullable=True),
    Column("epoch_seconds", Float, nullable=True),
    Column("images_per_s", Float, nullable=True),
    Column("weight_flips", Float, nullable=True),  # fraction of quantized weights whose level changed
    Column("device", String(64), nullable=True),
    Column("schedule", Json, nullable=True),
    UniqueConstraint("trial_id", "epoch"),  # exactly once per (trial, epoch); also the trial's index
)

# GET /runs/{id}/report of a finished run, rendered once (service.report): valid while ``fingerprint``
# (store.report_fingerprint: the run's results and the report format) is the run's current one
report_archives = Table(
    "report_archives", metadata,
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True),
    Column("png", Boolean, primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

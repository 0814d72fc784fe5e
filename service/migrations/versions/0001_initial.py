"""runs, trials, metrics

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
STATUS_CHECK = "status IN ('queued', 'running', 'done', 'failed', 'cancelled')"


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("worker_id", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trial_count", sa.Integer(), nullable=False),
        sa.CheckConstraint(STATUS_CHECK, name="ck_runs_status"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.UniqueConstraint("idempotency_key", name="uq_runs_idempotency_key"),
    )
    op.create_index("ix_runs_status_created_at_id", "runs", ["status", "created_at", "id"])
    op.create_index("ix_runs_dataset_model", "runs", ["dataset", "model"])

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(300), nullable=False),
        sa.Column("estimator", sa.String(64), nullable=False),
        sa.Column("estimator_label", sa.String(300), nullable=False),
        sa.Column("estimator_params", JSON, nullable=False),
        sa.Column("w_bits", sa.Integer(), nullable=False),
        sa.Column("a_bits", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), server_default="queued", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("epochs_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("final_test_acc", sa.Float(), nullable=True),
        sa.Column("final_val_acc", sa.Float(), nullable=True),
        sa.Column("best_val_acc", sa.Float(), nullable=True),
        sa.Column("final", JSON, nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(STATUS_CHECK, name="ck_trials_status"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_trials_run_id_runs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_trials"),
        sa.UniqueConstraint("run_id", "key", name="uq_trials_run_id_key"),
    )
    op.create_index("ix_trials_w_bits_a_bits", "trials", ["w_bits", "a_bits"])
    op.create_index("ix_trials_status", "trials", ["status"])

    op.create_table(
        "metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("train_acc", sa.Float(), nullable=True),
        sa.Column("val_acc", sa.Float(), nullable=True),
        sa.Column("test_acc", sa.Float(), nullable=True),
        sa.Column("lr", sa.Float(), nullable=True),
        sa.Column("epoch_seconds", sa.Float(), nullable=True),
        sa.Column("images_per_s", sa.Float(), nullable=True),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("schedule", JSON, nullable=True),
        sa.ForeignKeyConstraint(["trial_id"], ["trials.id"], name="fk_metrics_trial_id_trials", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.UniqueConstraint("trial_id", "epoch", name="uq_metrics_trial_id_epoch"),
    )


def downgrade() -> None:
    op.drop_table("metrics")
    op.drop_index("ix_trials_status", table_name="trials")
    op.drop_index("ix_trials_w_bits_a_bits", table_name="trials")
    op.drop_table("trials")
    op.drop_index("ix_runs_dataset_model", table_name="runs")
    op.drop_index("ix_runs_status_created_at_id", table_name="runs")
    op.drop_table("runs")

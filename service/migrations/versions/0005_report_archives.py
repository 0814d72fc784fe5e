"""report_archives: a finished run's zipped report, built once and served afterwards

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "report_archives",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("png", sa.Boolean(), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_report_archives_run_id_runs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "png", name="pk_report_archives"),
    )


def downgrade() -> None:
    op.drop_table("report_archives")

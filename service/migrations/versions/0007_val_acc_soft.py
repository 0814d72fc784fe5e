"""metrics: val_acc_soft (validation accuracy of the training forward, e.g. AQE's soft mix)

NULL for estimators whose training forward equals the hard one, and for epochs stored before it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("val_acc_soft", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("val_acc_soft")

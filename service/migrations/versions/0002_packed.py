"""trials: packed_bytes and packed_agreement of the XNOR/SHIFT export

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("packed_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("packed_agreement", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("packed_agreement")
        batch.drop_column("packed_bytes")

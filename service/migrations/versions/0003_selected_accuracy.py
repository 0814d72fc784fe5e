"""trials: selected_test_acc and selected_epoch (validation-selected); metrics: weight_flips

Existing finished trials get their selected accuracy from their stored epochs: the test
accuracy of the epoch with the highest validation accuracy, the earliest on ties.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trials") as batch:
        batch.add_column(sa.Column("selected_test_acc", sa.Float(), nullable=True))
        batch.add_column(sa.Column("selected_epoch", sa.Integer(), nullable=True))
    with op.batch_alter_table("metrics") as batch:
        batch.add_column(sa.Column("weight_flips", sa.Float(), nullable=True))
    # window functions: SQLite >= 3.25 and PostgreSQL alike
    op.execute("""
        UPDATE trials SET
            selected_test_acc = (SELECT ranked.test_acc FROM (
                SELECT trial_id, test_acc,
                       ROW_NUMBER() OVER (PARTITION BY trial_id ORDER BY val_acc DESC, epoch ASC) AS pick
                FROM metrics WHERE val_acc IS NOT NULL) AS ranked
                WHERE ranked.trial_id = trials.id AND ranked.pick = 1),
            selected_epoch = (SELECT ranked.epoch FROM (
                SELECT trial_id, epoch,
                       ROW_NUMBER() OVER (PARTITION BY trial_id ORDER BY val_acc DESC, epoch ASC) AS pick
                FROM metrics WHERE val_acc IS NOT NULL) AS ranked
                WHERE ranked.trial_id = trials.id AND ranked.pick = 1)
        WHERE status = 'done'
    """)


def downgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("weight_flips")
    with op.batch_alter_table("trials") as batch:
        batch.drop_column("selected_epoch")
        batch.drop_column("selected_test_acc")

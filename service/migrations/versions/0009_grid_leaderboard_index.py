"""trials.grid (the quantizer grid a trial's estimator quantizes to); the leaderboard's index ends in its dedupe order

``grid`` (``estimators.grids``; NULL for the float reference and for an estimator this revision does not know):
stored trials get theirs from their ``grid`` estimator parameter, else from :data:`DEFAULT_GRIDS`, each
estimator's own grid as the registry stood at this revision (``estimators`` loads torch, which a migration
must not).

The index for one trial per (protocol, estimator label, bits, seed) gains the dedupe's order, the latest
finished first (``finished_at DESC, id DESC``), so the leaderboard's ``ROW_NUMBER()`` reads the rows in order
where the planner scans the index (SQLite does: no sort left; bench/api_db.py). It replaces 0008's index,
whose columns are its prefix.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: estimator name -> its own grid (``Estimator.grids[0]``), estimators at this revision
DEFAULT_GRIDS = {
    "approx_sign": "minw", "aqe": "minw", "clipped_ste": "minw", "ede": "minw", "reste": "minw", "ste": "minw",
    "xnor": "minw", "dorefa": "uniform", "pact": "uniform", "dsq": "uniform_signed", "ewgs": "uniform_signed",
    "hwgq": "half_normal", "lq_nets": "learned_basis", "lsq": "learned_step",
}
CELL_SEED = ["protocol", "estimator_label", "w_bits", "a_bits", "seed"]
Cols = list[str | sa.TextClause]
OLD_INDEX: tuple[str, Cols] = ("ix_trials_protocol_estimator_label_w_bits_a_bits_seed", [*CELL_SEED])
NEW_INDEX: tuple[str, Cols] = ("ix_trials_leaderboard", [*CELL_SEED, sa.text("finished_at DESC"), sa.text("id DESC")])
CHUNK = 500  # ids per UPDATE


def grid_of(estimator: str, params) -> str | None:
    """A stored trial's grid: its ``grid`` parameter, else its estimator's own (None: float, or unknown)."""
    params = json.loads(params) if isinstance(params, str) else params or {}  # SQLite returns the JSON text
    return params.get("grid") or DEFAULT_GRIDS.get(estimator)


def _backfill(conn) -> None:
    trials = sa.table("trials", sa.column("id"), sa.column("estimator"), sa.column("estimator_params"),
                      sa.column("grid"))
    ids: dict[str, list[int]] = {}
    for tid, estimator, params in conn.execute(sa.select(trials.c.id, trials.c.estimator, trials.c.estimator_params)):
        if (grid := grid_of(estimator, params)) is not None:
            ids.setdefault(grid, []).append(tid)
    for grid, of_grid in ids.items():
        for i in range(0, len(of_grid), CHUNK):
            conn.execute(trials.update().where(trials.c.id.in_(of_grid[i:i + CHUNK])).values(grid=grid))


def upgrade() -> None:
    op.add_column("trials", sa.Column("grid", sa.String(32), nullable=True))  # in place, as 0008 (no table copy)
    _backfill(op.get_bind())
    op.drop_index(OLD_INDEX[0], table_name="trials")
    op.create_index(NEW_INDEX[0], "trials", NEW_INDEX[1])


def downgrade() -> None:
    op.drop_index(NEW_INDEX[0], table_name="trials")
    op.create_index(OLD_INDEX[0], "trials", OLD_INDEX[1])
    op.execute("ALTER TABLE trials DROP COLUMN grid")  # in place (SQLite ≥ 3.35): a table copy would cascade

"""runs.protocol, trials.protocol (+ labels): what a trial measures, so the leaderboard compares like with like

Existing rows get theirs computed from their stored spec (``workers.protocol``, plain Python: no torch)
at protocol version 1, the definitions they were trained with. A named method's trial takes its cell's
first/last-layer policy from :data:`METHOD_POLICIES`, the method registry as it stood at this revision
(``workers.methods`` loads torch, which a migration must not).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
import json

import sqlalchemy as sa
from alembic import op

from workers.protocol import protocol

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: method name -> {(w_bits, a_bits): first_last_float}, workers.methods at this revision
METHOD_POLICIES = {
    "binaryconnect": {(1, 32): False}, "bnn": {(1, 1): False}, "bwn": {(1, 32): False},
    "dorefa": {(1, 1): True, (1, 2): True, (8, 8): True, (1, 4): True}, "hwgq": {(1, 2): True},
    "lq_nets": {(2, 32): True, (3, 32): True, (1, 2): True},
    "minw_aqe": {(3, 32): False, (1, 32): False, (2, 32): False, (1, 1): False, (1, 2): True, (2, 8): False,
                 (3, 8): False},
    "tnn": {(2, 8): False}, "twn": {(2, 32): False},
    "xnor_net": {(1, 1): False},
}
PROTOCOL_VERSION_OF_STORED_RUNS = 1


def _backfill(conn) -> None:
    runs = sa.table("runs", sa.column("id"), sa.column("spec"), sa.column("protocol"), sa.column("protocol_label"))
    trials = sa.table("trials", sa.column("id"), sa.column("run_id"), sa.column("estimator_label"),
                      sa.column("w_bits"), sa.column("a_bits"), sa.column("protocol"), sa.column("protocol_label"))
    for run_id, spec in conn.execute(sa.select(runs.c.id, runs.c.spec)).all():
        spec = json.loads(spec) if isinstance(spec, str) else spec  # SQLite returns the JSON text here
        of_spec = protocol(spec, version=PROTOCOL_VERSION_OF_STORED_RUNS)
        conn.execute(runs.update().where(runs.c.id == run_id).values(protocol=of_spec.id, protocol_label=of_spec.label))
        conn.execute(trials.update().where(trials.c.run_id == run_id)
                     .values(protocol=of_spec.id, protocol_label=of_spec.label))
        methods = {m["name"] if isinstance(m, dict) else m for m in spec.get("methods") or []}
        for name in sorted(methods & METHOD_POLICIES.keys()):
            for (w, a), policy in METHOD_POLICIES[name].items():
                if policy == of_spec.definition["first_last_float"]:
                    continue
                own = protocol(spec, first_last_float=policy, version=PROTOCOL_VERSION_OF_STORED_RUNS)
                conn.execute(trials.update().where(trials.c.run_id == run_id, trials.c.estimator_label == name,
                                                   trials.c.w_bits == w, trials.c.a_bits == a)
                             .values(protocol=own.id, protocol_label=own.label))


def upgrade() -> None:
    # NOT NULL with a placeholder default, added in place: on SQLite a NOT NULL change recreates the table, and
    # dropping ``runs`` would cascade-delete every trial (PRAGMA foreign_keys is on). The placeholder is never
    # kept: every row gets its protocol below, and PostgreSQL drops the default (SQLite keeps it; unused).
    for table in ("runs", "trials"):
        op.add_column(table, sa.Column("protocol", sa.String(16), nullable=False, server_default=""))
        op.add_column(table, sa.Column("protocol_label", sa.String(300), nullable=False, server_default=""))
    _backfill(op.get_bind())
    if op.get_bind().dialect.name != "sqlite":
        for table in ("runs", "trials"):
            op.alter_column(table, "protocol", server_default=None)
            op.alter_column(table, "protocol_label", server_default=None)
    op.create_index("ix_runs_protocol", "runs", ["protocol"])
    op.create_index("ix_trials_protocol_estimator_label_w_bits_a_bits_seed", "trials",
                    ["protocol", "estimator_label", "w_bits", "a_bits", "seed"])


def downgrade() -> None:
    op.drop_index("ix_trials_protocol_estimator_label_w_bits_a_bits_seed", table_name="trials")
    op.drop_index("ix_runs_protocol", table_name="runs")
    for table in ("trials", "runs"):  # in place (SQLite ≥ 3.35): a batch table copy of runs would cascade
        for column in ("protocol_label", "protocol"):
            op.execute(f"ALTER TABLE {table} DROP COLUMN {column}")

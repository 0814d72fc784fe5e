"""A database at the dashboard's scale (issue 14): many runs, one of them a 2,000-trial grid, every
trial done with its per-epoch metrics. Used by tests/test_browser_scale.py, tests/test_dashboard_scale.py
and bench/pages.py.

``fill(engine)`` queues the runs through ``store.create_run`` (small runs first, the big one last,
so it is the newest), then marks every trial done with made-up accuracies and bulk-inserts the
metric rows (one ``executemany``), as a finished sweep leaves them.
"""
from __future__ import annotations

import json
import random

from sqlalchemy import bindparam, update
from sqlalchemy.engine import Engine

from service import store
from service.db import migrate, session_factory
from service.tables import metrics, runs, trials

BIG_ESTIMATORS = ("ste", "aqe", "clipped_ste", "dorefa", "lsq", "pact", "dsq", "ewgs", "reste", "ede")
BIG_BITS = {"w": [1, 2, 3, 4], "a": [1, 2, 3, 4, 5]}  # 20 cells: 200 trials per seed


def big_spec(seeds: int) -> dict:
    """10 estimators × 20 bit cells × ``seeds`` seeds (no float reference): 200 trials per seed."""
    return {"name": f"big sweep ({200 * seeds} trials)", "dataset": "digits", "estimators": list(BIG_ESTIMATORS),
            "bits": BIG_BITS, "seeds": list(range(seeds)), "include_full_precision": False, "epochs": 20}


def small_spec(i: int) -> dict:
    """A 5-trial run (two estimators at W1A1 and W2A2, the float reference); learning rates vary."""
    return {"name": f"small run {i}", "dataset": "digits", "estimators": ["ste", "aqe"],
            "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}], "seeds": [0], "epochs": 3,
            "optimizer": {"lr": round(0.01 * (1 + i % 3), 3)}}


def fill(engine: Engine, *, runs_total: int = 200, seeds: int = 10, epochs: int = 20, seed: int = 0) -> dict:
    """Migrate ``engine`` and add ``runs_total - 1`` small runs and one big run of ``200 × seeds``
    trials, all done, ``epochs`` metric rows per trial. Returns ``{"big_run", "small_runs",
    "trials", "metrics"}`` (ids and row counts)."""
    rng = random.Random(seed)
    migrate(engine)
    sessions = session_factory(engine)
    with sessions() as s:
        small = [store.create_run(s, small_spec(i))[0]["id"] for i in range(runs_total - 1)]
        big = store.create_run(s, big_spec(seeds))[0]["id"]
        rows = s.execute(trials.select().with_only_columns(trials.c.id, trials.c.w_bits, trials.c.a_bits)
                         .order_by(trials.c.id)).all()
        values = []
        for tid, w, a in rows:
            acc = min(1.0, 0.55 + 0.04 * min(w + a, 10) + rng.gauss(0, 0.01))
            values.append({"tid": tid, "acc": acc, "sel": acc - 0.002, "epochs": epochs,
                           "final": {"final_test_acc": acc, "selected_test_acc": acc - 0.002}})
        s.execute(update(trials).where(trials.c.id == bindparam("tid")).values(
            status="done", epochs_done=bindparam("epochs"), final_test_acc=bindparam("acc"),
            final_val_acc=bindparam("acc"), best_val_acc=bindparam("acc"), selected_test_acc=bindparam("sel"),
            selected_epoch=bindparam("epochs"), final=bindparam("final"), attempts=1, device="cpu"), values)
        s.execute(update(runs).values(status="done"))
        s.commit()
    schedule = json.dumps({"aqe.alpha": 0.5})
    metric_rows = [(tid, e, 1.0 / e, 0.9 * e / epochs, 0.88 * e / epochs, 0.87 * e / epochs, 0.01 * 0.98 ** e, 1.5,
                    900.0, "cpu", schedule) for tid, _, _ in rows for e in range(1, epochs + 1)]
    cols = ("trial_id", "epoch", "train_loss", "train_acc", "val_acc", "test_acc", "lr", "epoch_seconds",
            "images_per_s", "device", "schedule")
    with engine.begin() as c:
        c.exec_driver_sql(f"INSERT INTO {metrics.name} ({', '.join(cols)}) VALUES "
                          f"({', '.join(['%s' if engine.dialect.name == 'postgresql' else '?'] * len(cols))})",
                          metric_rows)
    return {"big_run": big, "small_runs": small, "trials": len(rows), "metrics": len(metric_rows)}

"""Trials store their quantizer grid and leaderboards show it; migration 0009 (trials.grid, backfilled, and the
leaderboard's index in its dedupe order); the leaderboard against a plain-Python reference: SQLite and PostgreSQL."""
from __future__ import annotations

import importlib.util
import random
import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import bindparam, event, inspect, select, update

import estimators
from service import store
from service.db import alembic_config, make_engine, migrate, session_factory
from service.sink import SqlSink
from service.tables import metrics, runs, trials
from tests.test_api import make_api  # noqa: F401  (fixture)
from workers.spec import parse_spec

pytestmark = pytest.mark.timeout(120)

MIGRATION = "service/migrations/versions/0009_grid_leaderboard_index.py"
BASE = {"name": "g", "estimators": ["aqe", "dorefa"], "bits": [{"w": 1, "a": 1}], "seeds": [0, 1], "epochs": 3,
        "include_full_precision": True}
OWN = {"aqe": "minw", "dorefa": "uniform", "float": None}  # each estimator's own grid
SHARED = {"aqe[grid=uniform]": "uniform", "dorefa": "uniform", "float": None}  # "quantizer": "uniform"


def finish_all(sessions, run: dict, acc: float = 0.7) -> None:
    sink = SqlSink(sessions, run["id"])
    with sessions() as s:
        keys = [t["key"] for t in store.list_trials(s, run["id"])]
    for i, key in enumerate(keys):
        sink.on_trial_end(key, "done", {"final_test_acc": acc + i / 100}, None)


# -- trials store it ---------------------------------------------------------------------------------
def test_a_trial_stores_the_grid_its_estimator_quantizes_to(session):
    own = store.create_run(session, BASE)[0]
    shared = store.create_run(session, {**BASE, "name": "shared", "quantizer": "uniform"})[0]
    stored = session.execute(select(trials.c.run_id, trials.c.estimator_label, trials.c.grid)).all()
    for run, expected in ((own, OWN), (shared, SHARED)):
        assert sorted((label, grid) for rid, label, grid in stored if rid == run["id"]) == sorted(
            [(label, grid) for label, grid in expected.items() for _seed in (0, 1)], key=str)
        assert {t["estimator_label"]: t["grid"] for t in store.list_trials(session, run["id"])} == expected


def test_the_leaderboard_json_carries_the_grid_and_the_page_shows_it(make_api):  # noqa: F811
    api = make_api()
    own = api.post_run(BASE)
    shared = api.post_run({**BASE, "name": "shared", "quantizer": "uniform"})
    for run in (own, shared):
        finish_all(api.sessions, run)
    assert {t["estimator_label"]: t["grid"] for t in api.get(f"/runs/{shared['id']}/trials").json()} == SHARED
    rows = api.get("/leaderboard").json()
    assert sorted((r["estimator_label"], r["grid"]) for r in rows) == sorted({**OWN, **SHARED}.items(), key=str)
    protocol = api.get(f"/runs/{shared['id']}").json()["protocol"]  # both runs: one protocol (the grid is no part)
    assert {r["protocol"] for r in rows} == {protocol}
    page = api.get("/dashboard/leaderboard", params={"dataset": "digits", "model": "digits_net",
                                                    "protocol": protocol}).text
    assert ">Grid</th>" in page
    shown = re.findall(r'data-estimator="([^"]*)"[^>]*data-grid="([^"]*)">', page)
    assert sorted(shown) == sorted((label, grid or "") for label, grid in {**OWN, **SHARED}.items())
    cells = re.findall(r'<td class="grid">([^<]*)</td>', page)
    assert sorted(cells) == sorted(grid or "—" for grid in {**OWN, **SHARED}.values())


def test_the_report_tables_have_a_grid_column(session, sessions, tmp_path):
    from service.report import build_report

    run = store.create_run(session, {**BASE, "quantizer": "uniform"})[0]
    finish_all(sessions, run)
    files = build_report(session, run["id"], tmp_path / "r", png=False)
    md = files["RESULTS.md"].read_text()
    assert "| rank | estimator | grid | mean ± std (%) | n | 95% interval (%) |" in md
    assert re.search(r"\| \d \| `aqe\[grid=uniform\]` \| uniform \| ", md), md
    assert "| 1 | `float` | – | " in md
    tex = files["leaderboard.tex"].read_text()
    assert "Estimator & Grid & W1A1 & float" in tex
    assert r"aqe[grid=uniform] & uniform & " in tex and r"dorefa & uniform & " in tex and "float & -- & " in tex


# -- migration 0009 ------------------------------------------------------------------------------------
def test_the_migration_imports_no_torch():
    code = ("import sys, importlib.util; "
            f"spec = importlib.util.spec_from_file_location('m', {MIGRATION!r}); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_frozen_grids_are_the_estimators_own_at_this_revision():
    spec = importlib.util.spec_from_file_location("m0009", MIGRATION)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_GRIDS == {n: estimators.get_estimator_class(n).grids[0]
                                    for n in estimators.list_estimators()}


def _indexes(eng) -> dict[str, list[str]]:
    return {ix["name"]: ix["column_names"] for ix in inspect(eng).get_indexes("trials")}


def test_migration_0009_backfills_the_grid_and_downgrades_in_place(db_url):
    """Stored trials get their ``grid`` parameter, else their estimator's own grid (None: float, or an estimator
    this revision does not know); the index is replaced; the downgrade drops both and keeps every row."""
    s = parse_spec(BASE)
    stored = [("aqe", {}, "minw"), ("aqe", {"grid": "uniform_signed"}, "uniform_signed"), ("dorefa", {}, "uniform"),
              ("lsq", {"backward": "x"}, "learned_step"), ("float", {}, None), ("retired", {}, None)]
    eng = make_engine(db_url)
    migrate(eng, "0008")
    with eng.begin() as conn:
        rid = conn.execute(runs.insert().values(
            name="old", status="done", dataset=s.dataset, model=s.model, spec=s.model_dump(mode="json"),
            spec_hash=s.spec_hash(), created_at=datetime.now(UTC), trial_count=len(stored), protocol="p" * 16,
            protocol_label="old").returning(runs.c.id)).scalar_one()
        conn.execute(trials.insert(), [
            {"run_id": rid, "key": f"t{i}", "estimator": name, "estimator_label": name, "estimator_params": params,
             "w_bits": 1, "a_bits": 1, "seed": 0, "status": "done", "protocol": "p" * 16, "protocol_label": "old"}
            for i, (name, params, _) in enumerate(stored)])
        first = conn.execute(select(trials.c.id).where(trials.c.key == "t0")).scalar_one()
        conn.execute(metrics.insert(), [{"trial_id": first, "epoch": e, "test_acc": 0.5} for e in (1, 2)])
    assert "ix_trials_protocol_estimator_label_w_bits_a_bits_seed" in _indexes(eng)
    migrate(eng)
    with eng.connect() as conn:
        got = dict(conn.execute(select(trials.c.key, trials.c.grid)).all())
    assert got == {f"t{i}": grid for i, (_, _, grid) in enumerate(stored)}
    ixs = _indexes(eng)
    assert "ix_trials_protocol_estimator_label_w_bits_a_bits_seed" not in ixs
    assert ixs["ix_trials_leaderboard"][:5] == ["protocol", "estimator_label", "w_bits", "a_bits", "seed"]

    with eng.connect() as conn:
        command.downgrade(alembic_config(conn), "0008")
        conn.commit()
    assert "grid" not in {c["name"] for c in inspect(eng).get_columns("trials")}
    ixs = _indexes(eng)
    assert "ix_trials_leaderboard" not in ixs
    assert ixs["ix_trials_protocol_estimator_label_w_bits_a_bits_seed"] == [
        "protocol", "estimator_label", "w_bits", "a_bits", "seed"]
    with eng.connect() as conn:  # in place: no table copy, so no cascade took the metric rows
        assert conn.execute(select(trials.c.key).order_by(trials.c.key)).scalars().all() == [
            f"t{i}" for i in range(len(stored))]
        assert len(conn.execute(select(metrics.c.id)).all()) == 2
    migrate(eng)  # and up again
    with eng.connect() as conn:
        assert dict(conn.execute(select(trials.c.key, trials.c.grid)).all()) == got
    eng.dispose()


# -- the leaderboard against a reference --------------------------------------------------------------
def _reference(rows: list[dict]) -> dict[tuple, tuple[list[dict], int]]:
    """(protocol, label, w_bits, a_bits) -> (the counted trials, how many trials in all): one trial per seed, the
    latest finished (a NULL finish time last), then the highest id."""
    cells: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        cells.setdefault((r["protocol"], r["estimator_label"], r["w_bits"], r["a_bits"]), {}).setdefault(
            r["seed"], []).append(r)
    never = datetime.min.replace(tzinfo=UTC)
    return {key: ([max(tried, key=lambda r: (r["finished_at"] is not None, r["finished_at"] or never, r["id"]))
                   for tried in by_seed.values()], sum(map(len, by_seed.values())))
            for key, by_seed in cells.items()}


def test_the_leaderboard_equals_a_plain_python_dedupe(session, sessions):
    """Repeated seeds across runs, equal finish times, finish times NULL, two protocols, two data sets."""
    rng = random.Random(14)
    made = []
    for i, over in enumerate([{}, {}, {"epochs": 4}, {"dataset": "mnist"}, {}]):
        made.append(store.create_run(session, {**BASE, "name": f"r{i}", "estimators": ["aqe", "ste", "lsq"],
                                               "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}],
                                               "seeds": [0, 1, 2], **over})[0])
    ids = session.execute(select(trials.c.id)).scalars().all()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    session.execute(update(trials).where(trials.c.id == bindparam("tid")).values(
        status=bindparam("st"), final_test_acc=bindparam("acc"), finished_at=bindparam("at"),
        packed_bytes=bindparam("pb"), packed_agreement=bindparam("pa")), [
        {"tid": tid, "st": rng.choice(["done"] * 5 + ["failed"]), "acc": rng.uniform(0.3, 0.9),
         "at": None if rng.random() < 0.15 else start + timedelta(seconds=rng.randrange(4)),  # many equal times
         "pb": rng.choice([None, 1000, 2000]), "pa": rng.choice([None, 0.99, 1.0])} for tid in ids])
    session.commit()
    done = [dict(r._mapping) for r in session.execute(
        select(trials, runs.c.dataset, runs.c.model).join(runs, runs.c.id == trials.c.run_id)
        .where(trials.c.status == "done"))]
    for kw in ({}, {"dataset": "mnist"}, {"run_id": made[1]["id"]}, {"protocol": made[2]["protocol"]}):
        expected = _reference([r for r in done if all(r[k] == v for k, v in kw.items())])
        board = {(r["protocol"], r["estimator_label"], r["w_bits"], r["a_bits"]): r
                 for r in store.leaderboard(session, **kw)}
        assert sorted(board) == sorted(expected) and len(expected) > 1, kw
        for key, (counted, total) in expected.items():
            row, accs = board[key], [r["final_test_acc"] for r in counted]
            assert (row["n"], row["set_aside"]) == (len(counted), total - len(counted)), (kw, key)
            assert row["mean"] == pytest.approx(statistics.mean(accs), rel=1e-12)
            assert row["std"] == (pytest.approx(statistics.stdev(accs), rel=1e-6) if len(accs) > 1 else None)
            packed = [r["packed_bytes"] for r in counted if r["packed_bytes"] is not None]
            assert row["packed_bytes"] == (round(statistics.mean(packed)) if packed else None)
            agree = [r["packed_agreement"] for r in counted if r["packed_agreement"] is not None]
            assert row["packed_agreement"] == (min(agree) if agree else None)
            assert (row["dataset"], row["model"], row["grid"]) == (
                counted[0]["dataset"], counted[0]["model"], counted[0]["grid"])
    assert sum(total - len(counted) for counted, total in _reference(done).values()) > 10  # repeats set aside


def test_sqlite_reads_the_leaderboard_in_index_order(tmp_path):
    """ix_trials_leaderboard ends in the dedupe's order: SQLite's plan scans it and sorts nothing for the window."""
    eng = make_engine(f"sqlite:///{tmp_path / 'plan.sqlite'}")
    migrate(eng)
    seen: list[tuple] = []
    event.listen(eng, "before_cursor_execute", lambda conn, cur, sql, params, ctx, many: seen.append((sql, params)))
    with session_factory(eng)() as s:
        store.create_run(s, BASE)
        store.leaderboard(s)
        sql, params = next(x for x in reversed(seen) if "row_number" in x[0].lower())
        plan = " / ".join(r[-1] for r in s.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params))
    assert "USING INDEX ix_trials_leaderboard" in plan and "ORDER BY" not in plan, plan
    eng.dispose()

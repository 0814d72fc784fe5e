"""service.store, service.db and service.sink against real SQLite and PostgreSQL databases."""
from __future__ import annotations

import math
import pickle
import statistics
import subprocess
import sys
import threading
import traceback
from datetime import datetime, timedelta

import pytest
from scipy import stats
from sqlalchemy import inspect, select, update

from service import store
from service.db import current_revision, head_revision, make_engine, migrate
from service.sink import SqlSink
from service.tables import metadata, metrics, runs, trials
from workers.records import LeaderboardRow, Metric, Progress, Run, Trial, TrialResult, TrialWithMetrics
from workers.spec import parse_spec

pytestmark = pytest.mark.timeout(120)


def make_spec(name="t", **over):
    body = {"name": name, "estimators": ["aqe", "ste", {"name": "aqe", "params": {"backward": "alg1"}}],
            "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}], "seeds": [0, 1], "epochs": 3}
    return parse_spec({**body, **over})


def table_rows(s, table, *where):
    return [dict(r._mapping) for r in s.execute(select(table).where(*where).order_by(table.c.id))]


def epoch_metrics(epoch, acc=0.5):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc, "val_acc": acc, "val_acc_soft": acc - 0.25,
            "test_acc": acc,
            "test_top5": min(1.0, acc + 0.25), "lr": 0.01, "epoch_seconds": 0.1, "images_per_s": 1000.0,
            "weight_flips": 0.01, "device": "cpu",
            "schedule": {"aqe.alpha": 0.5 + epoch / 10}}


# -- migrations -------------------------------------------------------------------------------
def test_migrated_schema_matches_tables(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    assert current_revision(engine) == head_revision() == "0009"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata) == []
        if engine.dialect.name == "sqlite":
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    migrate(engine)  # again: a no-op
    assert current_revision(engine) == head_revision() == "0009"


def test_migrations_race_on_an_empty_database(db_url):
    """Threads and processes migrating one empty database at the same moment all succeed."""
    start = threading.Barrier(4)
    errors = []

    def migrate_thread():
        eng = make_engine(db_url)
        try:
            start.wait()
            migrate(eng)
        except Exception:  # noqa: BLE001 - reported below
            errors.append(traceback.format_exc())
        finally:
            eng.dispose()

    code = "import sys; from service.db import make_engine, migrate; migrate(make_engine(sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, db_url], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    threads = [threading.Thread(target=migrate_thread) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outs = [(p.wait(timeout=60), p.stderr.read()) for p in procs]
    assert not errors
    assert all(rc == 0 for rc, _ in outs), outs
    eng = make_engine(db_url)
    assert current_revision(eng) == head_revision()
    assert {"runs", "trials", "metrics", "alembic_version"} <= set(inspect(eng).get_table_names())
    eng.dispose()


# -- runs and trials --------------------------------------------------------------------------
def test_create_run_makes_one_trial_row_per_cell(session):
    spec = make_spec()
    run, created = store.create_run(session, spec)
    assert created and run["status"] == "queued" and run["trial_count"] == 14
    assert run["spec"] == spec.model_dump(mode="json") and run["spec_hash"] == spec.spec_hash()
    assert run["progress"] == {"queued": 14, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
    assert datetime.fromisoformat(run["created_at"]).utcoffset() == timedelta(0)
    rows = table_rows(session, trials, trials.c.run_id == run["id"])
    assert [r["key"] for r in rows] == [t.key for t in spec.trials()]
    by_key = {r["key"]: r for r in rows}
    alg1 = by_key["aqe[backward=alg1]-w2a2-s1"]
    assert (alg1["estimator"], alg1["estimator_label"], alg1["estimator_params"]) == ("aqe", "aqe[backward=alg1]",
                                                                                       {"backward": "alg1"})
    assert (alg1["w_bits"], alg1["a_bits"], alg1["seed"]) == (2, 2, 1)
    ref = by_key["float-w32a32-s0"]
    assert (ref["estimator"], ref["estimator_label"], ref["w_bits"], ref["a_bits"]) == ("float", "float", 32, 32)
    assert all(r["status"] == "queued" and r["attempts"] == 0 and r["epochs_done"] == 0 for r in rows)
    assert store.list_trials(session, run["id"])[5]["key"] == rows[5]["key"]
    assert store.count_rows(session) == {"runs": 1, "trials": 14, "metrics": 0}


def test_records_have_the_shapes_of_workers_records(session, sessions):
    """Every record the store returns has exactly its TypedDict's keys; labels are the spec's, not parsed keys."""
    spec = make_spec(methods=["tnn"], seeds=[0])
    run = store.create_run(session, spec)[0]
    sink = SqlSink(sessions, run["id"])
    sink.on_epoch("tnn-w2a8-s0", epoch_metrics(1))
    sink.on_trial_end("tnn-w2a8-s0", "done", {"final_test_acc": 0.5}, None)
    listed = store.list_trials(session, run["id"])
    assert [t["estimator_label"] for t in listed] == [t.label for t in spec.trials()]
    tnn = next(t for t in listed if t["key"] == "tnn-w2a8-s0")
    assert (tnn["estimator"], tnn["estimator_label"]) == ("xnor", "tnn")  # the method's name, not its estimator's
    assert set(run) == set(Run.__annotations__) and set(run["progress"]) == set(Progress.__annotations__)
    assert all(set(t) == set(Trial.__annotations__) for t in listed)
    detail = store.get_trial(session, tnn["id"])
    assert set(detail) == set(TrialWithMetrics.__annotations__)
    assert set(detail["metrics"][0]) == set(Metric.__annotations__)
    assert set(store.run_results(session, run["id"])[0]) == set(TrialResult.__annotations__)
    assert set(store.leaderboard(session)[0]) == set(LeaderboardRow.__annotations__)


def test_create_run_accepts_a_dict(session):
    run, created = store.create_run(session, {"name": "d", "estimators": ["ste"], "seeds": [3]})
    assert created and run["trial_count"] == 2 and run["dataset"] == "digits"


def test_idempotency_key(session, sessions):
    spec = make_spec()
    first, created = store.create_run(session, spec, idempotency_key="k1")
    again, created_again = store.create_run(session, make_spec(), idempotency_key="k1")
    assert created and not created_again and again["id"] == first["id"]
    with pytest.raises(store.IdempotencyConflict) as err:
        store.create_run(session, make_spec(seeds=[0, 1, 2]), idempotency_key="k1")
    assert err.value.run_id == first["id"]
    other, created_other = store.create_run(session, spec)  # no key: a new run every time
    assert created_other and other["id"] != first["id"]
    assert store.count_rows(session) == {"runs": 2, "trials": 28, "metrics": 0}

    # concurrent requests with one key create one run
    got, start = [], threading.Barrier(6)

    def post():
        with sessions() as s:
            start.wait()
            got.append(store.create_run(s, spec, idempotency_key="k2"))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6 and len({r["id"] for r, _ in got}) == 1 and sum(c for _, c in got) == 1
    assert store.count_rows(session)["runs"] == 3


def test_list_runs_filters_and_pages(session):
    ids = [store.create_run(session, make_spec(f"r{i}", dataset="mnist" if i % 2 else "digits"))[0]["id"]
           for i in range(5)]
    page, total = store.list_runs(session, limit=2)
    assert total == 5 and [r["id"] for r in page] == ids[::-1][:2]
    page, total = store.list_runs(session, dataset="mnist")
    assert total == 2 and {r["id"] for r in page} == {ids[1], ids[3]}
    page, total = store.list_runs(session, dataset="digits", limit=1, offset=2)
    assert total == 3 and [r["id"] for r in page] == [ids[0]]
    store.claim_run(session, "w")
    assert store.list_runs(session, status="running")[1] == 1
    assert store.list_runs(session, model="nope") == ([], 0)
    assert store.get_run(session, 10_000) is None and store.get_trial(session, 10_000) is None


# -- the queue --------------------------------------------------------------------------------
def test_claim_takes_the_oldest_queued_run(session):
    a = store.create_run(session, make_spec("a"))[0]
    b = store.create_run(session, make_spec("b"))[0]
    got = store.claim_run(session, "w1")
    assert got["id"] == a["id"] and got["status"] == "running" and got["started_at"]
    assert store.claim_run(session, "w2")["id"] == b["id"]
    assert store.claim_run(session, "w3") is None
    held = {r["id"]: r["worker_id"] for r in table_rows(session, runs)}
    assert held == {a["id"]: "w1", b["id"]: "w2"}


def test_concurrent_claims_take_each_run_once(sessions, session):
    n_runs, n_workers = 30, 8
    for i in range(n_runs):
        store.create_run(session, make_spec(f"r{i}", estimators=["ste"], seeds=[0]))
    claims: dict[str, list[int]] = {f"w{i}": [] for i in range(n_workers)}
    start = threading.Barrier(n_workers)

    def worker(wid):
        start.wait()
        with sessions() as s:
            while (run := store.claim_run(s, wid)) is not None:
                claims[wid].append(run["id"])

    threads = [threading.Thread(target=worker, args=(w,)) for w in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [rid for ids in claims.values() for rid in ids]
    assert sorted(taken) == sorted(set(taken)) and len(taken) == n_runs
    rows = table_rows(session, runs)
    assert all(r["status"] == "running" for r in rows)
    assert {r["id"]: r["worker_id"] for r in rows} == {rid: w for w, ids in claims.items() for rid in ids}


def test_heartbeat_and_stale_requeue_keep_finished_work(session, sessions):
    run = store.create_run(session, make_spec())[0]
    rid = run["id"]
    assert store.claim_run(session, "dead")["id"] == rid
    assert store.heartbeat(session, rid, "dead") and not store.heartbeat(session, rid, "someone-else")
    sink = SqlSink(sessions, rid)
    sink.on_trial_start("ste-w1a1-s0", {"device": "cpu", "attempt": 1})
    for e in (1, 2, 3):
        sink.on_epoch("ste-w1a1-s0", epoch_metrics(e))
    sink.on_trial_end("ste-w1a1-s0", "done", {"final_test_acc": 0.9}, None)
    sink.on_trial_start("aqe-w1a1-s0", {"device": "cpu", "attempt": 1})
    sink.on_epoch("aqe-w1a1-s0", epoch_metrics(1))

    assert store.requeue_stale(session, 60) == []  # fresh heartbeat: still held
    old = datetime.now().astimezone() - timedelta(seconds=120)
    session.execute(update(runs).where(runs.c.id == rid).values(heartbeat_at=old))
    session.commit()
    assert store.requeue_stale(session, 60) == [rid]
    got = store.get_run(session, rid)
    assert got["status"] == "queued" and got["progress"]["done"] == 1 and got["progress"]["running"] == 0
    by_key = {t["key"]: t for t in store.list_trials(session, rid)}
    assert by_key["ste-w1a1-s0"]["status"] == "done" and by_key["aqe-w1a1-s0"]["status"] == "queued"
    assert by_key["aqe-w1a1-s0"]["epochs_done"] == 1 and store.count_rows(session)["metrics"] == 4

    assert not store.heartbeat(session, rid, "dead")  # the dead holder lost its claim
    assert store.claim_run(session, "alive")["id"] == rid
    assert not store.finish_run(session, rid, "done", worker_id="dead")
    assert store.finish_run(session, rid, "failed", "boom", worker_id="alive")
    got = store.get_run(session, rid)
    assert got["status"] == "failed" and got["error"] == "boom" and got["finished_at"]
    assert got["progress"] == {"queued": 0, "running": 0, "done": 1, "failed": 0, "cancelled": 13}


def test_claim_run_with_stale_s_requeues_first(session):
    rid = store.create_run(session, make_spec())[0]["id"]
    store.claim_run(session, "dead")
    session.execute(update(runs).values(heartbeat_at=datetime.now().astimezone() - timedelta(hours=1)))
    session.commit()
    assert store.claim_run(session, "alive") is None
    assert store.claim_run(session, "alive", stale_s=30)["id"] == rid


def test_release_run(session):
    rid = store.create_run(session, make_spec())[0]["id"]
    store.claim_run(session, "w")
    assert not store.release_run(session, rid, "other")
    assert store.release_run(session, rid, "w")
    assert store.get_run(session, rid)["status"] == "queued"


def test_cancel_paths(session):
    queued = store.create_run(session, make_spec("q"))[0]["id"]
    running = store.create_run(session, make_spec("r"))[0]["id"]
    done = store.create_run(session, make_spec("d"))[0]["id"]
    stale = store.create_run(session, make_spec("s"))[0]["id"]
    for rid in (running, done, stale):
        session.execute(update(runs).where(runs.c.id == rid).values(
            status="running", worker_id="w", heartbeat_at=datetime.now().astimezone()))
    session.commit()
    store.finish_run(session, done, "done")

    got = store.request_cancel(session, queued)
    assert got["status"] == "cancelled" and got["finished_at"] and got["progress"]["cancelled"] == 14
    assert store.cancel_requested(session, queued)

    got = store.request_cancel(session, running)
    assert got["status"] == "running" and got["cancel_requested"] and store.cancel_requested(session, running)
    assert store.claim_run(session, "w2") is None  # nothing queued

    assert store.request_cancel(session, done)["status"] == "done" and not store.cancel_requested(session, done)
    assert store.request_cancel(session, 999) is None and not store.cancel_requested(session, 999)

    store.request_cancel(session, stale)  # its holder died: requeueing it cancels it
    session.execute(update(runs).where(runs.c.id == stale).values(heartbeat_at=None))
    session.commit()
    assert store.requeue_stale(session, 30) == []
    got = store.get_run(session, stale)
    assert got["status"] == "cancelled" and got["progress"]["cancelled"] == 14

    assert store.finish_run(session, running, "cancelled", "cancelled on request")
    assert store.get_run(session, running)["progress"]["cancelled"] == 14
    with pytest.raises(ValueError):
        store.finish_run(session, running, "running")


# -- sink -------------------------------------------------------------------------------------
def test_sql_sink_stores_each_epoch_once(session, sessions):
    rid = store.create_run(session, make_spec())[0]["id"]
    sink = SqlSink(sessions, rid)
    key = "aqe-w1a1-s0"
    sink.on_trial_start(key, {"device": "cpu", "attempt": 1})
    sink.on_epoch(key, epoch_metrics(1, acc=0.4))
    sink.on_epoch(key, epoch_metrics(1, acc=0.99))  # a replay after a restart: ignored
    start = threading.Barrier(4)

    def report():  # four threads racing on the same epochs
        start.wait()
        for e in (2, 3):
            sink.on_epoch(key, epoch_metrics(e, acc=0.5 + e / 10))

    threads = [threading.Thread(target=report) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tid = store.trial_ids(session, rid)[key]
    rows = table_rows(session, metrics, metrics.c.trial_id == tid)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and rows[0]["test_acc"] == 0.4
    trial = store.get_trial(session, tid)
    assert trial["status"] == "running" and trial["epochs_done"] == 3 and trial["attempts"] == 1
    assert trial["device"] == "cpu" and trial["started_at"]
    assert trial["metrics"][1] == {**epoch_metrics(2, acc=0.7)}

    # a restarted trial (attempt 2) replays epoch 3 and goes on; a pickled sink (as Tune saves it) works
    clone = pickle.loads(pickle.dumps(sink))
    clone.on_trial_start(key, {"device": "cuda:0", "attempt": 2})
    for e in (3, 4):
        clone.on_epoch(key, epoch_metrics(e))
    final = {"final_test_acc": 0.81, "final_val_acc": 0.8, "best_val_acc": 0.83, "best_epoch": 4, "epochs": 4,
             "weight_bits_total": 1000, "weight_mib": 0.0001}
    clone.on_trial_end(key, "done", final, None)
    trial = store.get_trial(session, tid)
    assert (trial["status"], trial["attempts"], trial["epochs_done"], trial["device"]) == ("done", 2, 4, "cuda:0")
    assert (trial["final_test_acc"], trial["final_val_acc"], trial["best_val_acc"]) == (0.81, 0.8, 0.83)
    assert trial["finished_at"] and [m["epoch"] for m in trial["metrics"]] == [1, 2, 3, 4]
    assert store.count_rows(session)["metrics"] == 4
    assert store.run_results(session, rid) == [{**{k: v for k, v in trial.items() if k != "metrics"},
                                                "final": final}]

    sink.on_trial_end("ste-w1a1-s0", "failed", None, "Traceback: boom")
    failed = store.list_trials(session, rid)[3]
    assert (failed["key"], failed["status"], failed["error"]) == ("ste-w1a1-s0", "failed", "Traceback: boom")
    with pytest.raises(KeyError):
        sink.on_epoch("no-such-trial", epoch_metrics(1))
    with pytest.raises(ValueError):
        sink.on_trial_end(key, "running", None, None)


def test_sink_stores_non_finite_and_numpy_values(session, sessions):
    np = pytest.importorskip("numpy")
    rid = store.create_run(session, make_spec())[0]["id"]
    sink = SqlSink(sessions, rid)
    sink.on_epoch("ste-w2a2-s1", {**epoch_metrics(1), "train_loss": float("nan"), "lr": np.float32(0.5),
                                  "schedule": {"a": np.float64(0.25), "b": float("inf"), "c": np.float32(0.125),
                                               "d": np.int64(3), "e": np.float32("nan")}})
    (m,) = store.trial_metrics(session, store.trial_ids(session, rid)["ste-w2a2-s1"])
    assert m["train_loss"] is None and m["lr"] == 0.5
    assert m["schedule"] == {"a": 0.25, "b": None, "c": 0.125, "d": 3, "e": None}
    assert [type(m["schedule"][k]) for k in "acd"] == [float, float, int]


def test_export_rows(session, sessions):
    rid = store.create_run(session, make_spec())[0]["id"]
    sink = SqlSink(sessions, rid)
    for key in ("ste-w1a1-s0", "float-w32a32-s0"):
        for e in (1, 2):
            sink.on_epoch(key, epoch_metrics(e))
    rows = store.export_rows(session, rid)
    assert [(r["trial_key"], r["epoch"]) for r in rows] == [
        ("float-w32a32-s0", 1), ("float-w32a32-s0", 2), ("ste-w1a1-s0", 1), ("ste-w1a1-s0", 2)]
    assert rows[0] == {"run_id": rid, "trial_key": "float-w32a32-s0", "estimator": "float",
                       "estimator_label": "float", "w_bits": 32, "a_bits": 32, "seed": 0,
                       **{k: v for k, v in epoch_metrics(1).items() if k != "schedule"}, "schedule.aqe.alpha": 0.6}


def test_run_by_spec_hash_finds_the_newest_run_of_a_spec(session):
    spec, other = make_spec("a"), make_spec("b")
    first = store.create_run(session, spec)[0]
    store.create_run(session, other)
    again = store.create_run(session, spec)[0]  # no idempotency key: a second run of the same spec
    assert store.run_by_spec_hash(session, spec.spec_hash()) == store.get_run(session, again["id"]) != first
    assert store.run_by_spec_hash(session, other.spec_hash())["name"] == "b"
    assert store.run_by_spec_hash(session, "0" * 64) is None


def test_datasets_models_lists_the_pairs_with_finished_results(session, sessions):
    """One SELECT DISTINCT: pairs with a done trial that has the metric; the leaderboard's groups."""
    specs = {"digits": make_spec("d"), "mnist": make_spec("m", dataset="mnist"),
             "fashion_mnist": make_spec("f", dataset="fashion_mnist"), "synthetic": make_spec("s", dataset="synthetic")}
    rids = {name: store.create_run(session, spec)[0]["id"] for name, spec in specs.items()}
    assert store.datasets_models(session) == []
    for seed in (0, 1):  # two done trials of one pair: listed once
        SqlSink(sessions, rids["mnist"]).on_trial_end(f"aqe-w1a1-s{seed}", "done", {"final_test_acc": 0.5}, None)
    SqlSink(sessions, rids["digits"]).on_trial_end("ste-w2a2-s0", "done",
                                                   {"final_test_acc": 0.7, "selected_test_acc": 0.6}, None)
    SqlSink(sessions, rids["fashion_mnist"]).on_trial_end("ste-w1a1-s0", "failed", {"final_test_acc": 0.1}, "x")
    SqlSink(sessions, rids["synthetic"]).on_trial_end("ste-w1a1-s0", "done", {}, None)  # done without a result
    assert store.datasets_models(session) == [("digits", "digits_net"), ("mnist", "digits_net")]
    assert store.datasets_models(session) == sorted({(r["dataset"], r["model"]) for r in store.leaderboard(session)})
    assert store.datasets_models(session, metric="selected") == [("digits", "digits_net")]
    with pytest.raises(ValueError, match="unknown metric 'best'"):
        store.datasets_models(session, metric="best")


# -- leaderboard ------------------------------------------------------------------------------
def test_leaderboard_interval_is_clipped_to_accuracy_bounds(session, sessions):
    rid = store.create_run(session, make_spec(seeds=[0, 1]))[0]["id"]
    sink = SqlSink(sessions, rid)
    half = stats.t.ppf(0.975, 1) * statistics.stdev([0.99, 0.97]) / math.sqrt(2)  # ≈ 0.127 for both pairs
    for label, values in {"aqe": [0.99, 0.97], "ste": [0.05, 0.03]}.items():
        for seed, acc in enumerate(values):
            sink.on_trial_end(f"{label}-w1a1-s{seed}", "done", {"final_test_acc": acc}, None)
    got = {r["estimator_label"]: r for r in store.leaderboard(session, run_id=rid)}
    assert got["aqe"]["ci_low"] == pytest.approx(0.98 - half, rel=1e-6) and got["aqe"]["ci_high"] == 1.0
    assert got["ste"]["ci_low"] == 0.0 and got["ste"]["ci_high"] == pytest.approx(0.04 + half, rel=1e-6)


def test_leaderboard_orders_by_total_bits_with_the_float_reference_last(session, sessions):
    """W1A32 (float activations) has 33 bits: after W2A2, before the full-precision reference."""
    spec = make_spec(estimators=["ste"], bits=[{"w": 2, "a": 2}, {"w": 1, "a": 32}, {"w": 1, "a": 1}], seeds=[0])
    rid = store.create_run(session, spec)[0]["id"]
    sink = SqlSink(sessions, rid)
    for key in ("ste-w1a32-s0", "float-w32a32-s0", "ste-w2a2-s0", "ste-w1a1-s0"):
        sink.on_trial_end(key, "done", {"final_test_acc": 0.5}, None)
    board = store.leaderboard(session, run_id=rid)
    assert [(r["w_bits"], r["a_bits"]) for r in board] == [(1, 1), (2, 2), (1, 32), (32, 32)]


def test_leaderboard_matches_a_hand_computation(session, sessions):
    spec = make_spec(seeds=[0, 1, 2])
    mnist = make_spec("m", dataset="mnist", estimators=["ste"], seeds=[0])
    rid = store.create_run(session, spec)[0]["id"]
    mid = store.create_run(session, mnist)[0]["id"]
    accs = {  # label, w, a -> per seed
        ("float", 32, 32): [0.97, 0.96, 0.98],
        ("aqe", 1, 1): [0.80, 0.82, 0.84],
        ("ste", 1, 1): [0.70, 0.75, 0.65],
        ("aqe[backward=alg1]", 1, 1): [0.81, 0.83, 0.80],
        ("aqe", 2, 2): [0.90, 0.91],  # third seed failed: not counted
        ("ste", 2, 2): [0.91, 0.90],  # the same mean as aqe W2A2: a tie
        ("aqe[backward=alg1]", 2, 2): [0.5],  # two seeds still running: n = 1
    }
    sink = SqlSink(sessions, rid)
    for (label, w, a), values in accs.items():
        for seed, acc in enumerate(values):
            sink.on_trial_end(f"{label}-w{w}a{a}-s{seed}", "done", {"final_test_acc": acc}, None)
    sink.on_trial_end("aqe-w2a2-s2", "failed", {"final_test_acc": 0.1}, "diverged")
    SqlSink(sessions, mid).on_trial_end("ste-w1a1-s0", "done", {"final_test_acc": 0.5, "packed_bytes": 1234.0,
                                                               "packed_agreement": 0.999}, None)

    board = store.leaderboard(session, dataset="digits")
    got = {(r["estimator_label"], r["w_bits"], r["a_bits"]): r for r in board}
    assert set(got) == set(accs)
    for key, values in accs.items():
        row = got[key]
        assert (row["dataset"], row["model"], row["n"]) == ("digits", "digits_net", len(values))
        assert row["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
        if len(values) < 2:
            assert row["std"] is row["ci_low"] is row["ci_high"] is None
            continue
        sd = statistics.stdev(values)
        half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
        assert row["std"] == pytest.approx(sd, rel=1e-6)
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(row["mean"] - half, rel=1e-6),
                                                   pytest.approx(row["mean"] + half, rel=1e-6))
    order = [(r["estimator_label"], r["w_bits"], r["rank"], r["best"]) for r in board]
    assert order == [("aqe", 1, 1, True), ("aqe[backward=alg1]", 1, 2, False), ("ste", 1, 3, False),
                     ("aqe", 2, 1, True), ("ste", 2, 1, True), ("aqe[backward=alg1]", 2, 3, False),
                     ("float", 32, 1, True)]

    everything = store.leaderboard(session)
    assert len(everything) == len(accs) + 1
    of_mnist = store.get_run(session, mid)
    assert store.leaderboard(session, dataset="mnist") == [
        {"protocol": of_mnist["protocol"], "protocol_label": "mnist/digits_net · 3 ep · adam 0.01 exp 0.98 · bs 128",
         "dataset": "mnist", "model": "digits_net", "w_bits": 1, "a_bits": 1, "estimator_label": "ste",
         "grid": "minw", "metric": "final", "n": 1, "set_aside": 0,
         "mean": 0.5, "std": None, "ci_low": None, "ci_high": None, "rank": 1, "best": True,
         "packed_bytes": 1234, "packed_agreement": 0.999}]
    assert got[("aqe", 1, 1)]["packed_bytes"] is None
    assert store.leaderboard(session, dataset="digits", model="other") == []


def test_leaderboard_ranks_by_the_selected_accuracy_when_asked(session, sessions):
    """final and selected rank the same trials differently; each row names its metric."""
    rid = store.create_run(session, make_spec(estimators=["aqe", "ste"], bits=[{"w": 1, "a": 1}],
                                              include_full_precision=False))[0]["id"]
    sink = SqlSink(sessions, rid)
    # aqe ends high but its validation peaked where test was lower; ste lost points in its last epoch
    values = {"aqe": [(0.90, 0.80, 3), (0.88, 0.82, 2)], "ste": [(0.85, 0.91, 2), (0.83, 0.89, 1)]}
    for label, seeds in values.items():
        for seed, (final, selected, epoch) in enumerate(seeds):
            sink.on_trial_end(f"{label}-w1a1-s{seed}", "done",
                              {"final_test_acc": final, "selected_test_acc": selected, "selected_epoch": epoch}, None)
    by_final = store.leaderboard(session, run_id=rid)
    by_selected = store.leaderboard(session, run_id=rid, metric="selected")
    assert [(r["estimator_label"], r["rank"], r["metric"]) for r in by_final] == [("aqe", 1, "final"),
                                                                                   ("ste", 2, "final")]
    assert [(r["estimator_label"], r["rank"], r["metric"]) for r in by_selected] == [("ste", 1, "selected"),
                                                                                      ("aqe", 2, "selected")]
    assert by_selected[0]["mean"] == pytest.approx(0.90) and by_final[0]["mean"] == pytest.approx(0.89)
    trial = store.list_trials(session, rid)[0]
    assert (trial["selected_test_acc"], trial["selected_epoch"]) == (0.80, 3)
    assert isinstance(trial["selected_epoch"], int)
    with pytest.raises(ValueError, match="unknown metric 'best_test'"):
        store.leaderboard(session, metric="best_test")


def test_migration_0003_selects_on_validation_for_existing_trials(db_url):
    """Trials finished before 0003 get the test accuracy of their best validation epoch (earliest on ties)."""
    eng = make_engine(db_url)
    migrate(eng, "0002")
    epochs = {  # epoch: (val, test)
        "a": {1: (0.5, 0.55), 2: (0.8, 0.70), 3: (0.8, 0.90), 4: (0.6, 0.95)},  # tie at 0.8: epoch 2 wins
        "b": {1: (0.9, 0.60), 2: (0.7, 0.99)},
    }
    with eng.begin() as conn:
        rid = conn.execute(runs.insert().values(name="old", status="done", dataset="digits", model="digits_net",
                                                spec={}, spec_hash="x", created_at=datetime.now(),
                                                trial_count=3).returning(runs.c.id)).scalar_one()
        ids = {}
        for key, status in (("a", "done"), ("b", "done"), ("c", "running")):
            ids[key] = conn.execute(trials.insert().values(
                run_id=rid, key=key, estimator="aqe", estimator_label="aqe", estimator_params={}, w_bits=1,
                a_bits=1, seed=0, status=status).returning(trials.c.id)).scalar_one()
        for key, rows in {**epochs, "c": {1: (0.5, 0.5)}}.items():
            conn.execute(metrics.insert(), [{"trial_id": ids[key], "epoch": e, "val_acc": v, "test_acc": t}
                                            for e, (v, t) in rows.items()])
    migrate(eng)
    with eng.connect() as conn:
        got = {r.key: (r.selected_test_acc, r.selected_epoch)
               for r in conn.execute(select(trials.c.key, trials.c.selected_test_acc, trials.c.selected_epoch))}
    eng.dispose()
    assert got == {"a": (0.70, 2), "b": (0.60, 1), "c": (None, None)}


def test_migration_0004_adds_top5_and_keeps_older_epochs(db_url):
    """Epochs stored before 0004 keep their values and have no top-5 accuracy (it was never measured)."""
    eng = make_engine(db_url)
    migrate(eng, "0003")
    assert "test_top5" not in {c["name"] for c in inspect(eng).get_columns("metrics")}
    with eng.begin() as conn:
        rid = conn.execute(runs.insert().values(name="old", status="done", dataset="digits", model="digits_net",
                                                spec={}, spec_hash="x", created_at=datetime.now(),
                                                trial_count=1).returning(runs.c.id)).scalar_one()
        tid = conn.execute(trials.insert().values(
            run_id=rid, key="a", estimator="aqe", estimator_label="aqe", estimator_params={}, w_bits=1,
            a_bits=1, seed=0, status="done").returning(trials.c.id)).scalar_one()
        conn.exec_driver_sql(f"INSERT INTO metrics (trial_id, epoch, test_acc) VALUES ({tid}, 1, 0.5)")
    migrate(eng)
    with eng.connect() as conn:
        rows = conn.execute(select(metrics.c.epoch, metrics.c.test_acc, metrics.c.test_top5)).all()
    eng.dispose()
    assert [tuple(r) for r in rows] == [(1, 0.5, None)]


def test_each_trial_update_changes_its_own_trial_only(session):
    """Start, provenance, epoch and end of one trial leave every other trial's row as it was."""
    rid = store.create_run(session, make_spec())[0]["id"]
    ids = store.trial_ids(session, rid)
    a = ids["aqe-w1a1-s0"]
    others = table_rows(session, trials, trials.c.id != a)
    store.record_trial_start(session, a, device="cpu")
    store.record_provenance(session, a, {"host": "h", "device": "cuda:0"})
    assert store.record_epoch(session, a, epoch_metrics(1))
    store.record_trial_end(session, a, "failed", error="boom")
    got = store.get_trial(session, a)
    assert (got["status"], got["device"], got["provenance"]["host"], got["epochs_done"]) == ("failed", "cuda:0", "h", 1)
    assert table_rows(session, trials, trials.c.id != a) == others


def test_a_page_of_trials_is_limit_trials_from_offset_in_grid_order(session):
    rid = store.create_run(session, make_spec())[0]["id"]
    keys = [t["key"] for t in store.list_trials(session, rid)]
    assert len(keys) == 14 and keys == [t.key for t in make_spec().trials()]
    assert [t["key"] for t in store.list_trials(session, rid, limit=3)] == keys[:3]
    assert [t["key"] for t in store.list_trials(session, rid, limit=3, offset=12)] == keys[12:]


def test_an_epoch_of_a_queued_trial_starts_it_and_a_repeated_epoch_reports_false(session):
    rid = store.create_run(session, make_spec())[0]["id"]
    tid = store.trial_ids(session, rid)["ste-w1a1-s0"]
    assert store.record_epoch(session, tid, epoch_metrics(1)) is True
    assert store.get_trial(session, tid)["status"] == "running"
    assert store.record_epoch(session, tid, epoch_metrics(1, acc=0.9)) is False
    store.record_trial_end(session, tid, "done", {"final_test_acc": 0.5})
    assert store.record_epoch(session, tid, epoch_metrics(2)) is True  # a late epoch: stored, the trial stays done
    got = store.get_trial(session, tid)
    assert got["status"] == "done" and got["epochs_done"] == 2 and got["metrics"][0]["test_acc"] == 0.5


def test_a_heartbeat_exactly_stale_s_old_is_not_stale_yet(session, monkeypatch):
    import service.store.queue as queue

    rid = store.create_run(session, make_spec())[0]["id"]
    store.claim_run(session, "w")
    beat = datetime(2026, 1, 1, 12, 0, 0).astimezone()
    session.execute(update(runs).where(runs.c.id == rid).values(heartbeat_at=beat))
    session.commit()
    monkeypatch.setattr(queue, "utcnow", lambda: beat + timedelta(seconds=30))
    assert store.requeue_stale(session, 30) == []
    monkeypatch.setattr(queue, "utcnow", lambda: beat + timedelta(seconds=30, microseconds=1))
    assert store.requeue_stale(session, 30) == [rid]


def test_a_cancel_request_marks_only_its_run(session):
    a, b = (store.create_run(session, make_spec(n))[0]["id"] for n in ("a", "b"))
    assert store.request_cancel(session, a)["cancel_requested"]
    assert store.cancel_requested(session, a) and not store.cancel_requested(session, b)


def test_a_runs_results_fingerprint_follows_its_own_rows_only(session, sessions):
    """The digest changes with the run's row, its trials and its metric rows, not with another run's."""
    a, b = (store.create_run(session, make_spec(n))[0]["id"] for n in ("a", "b"))
    assert store.results_fingerprint(session, 10**6) is None
    status, first = store.results_fingerprint(session, a)
    assert status == "queued" and len(first) == 64
    sink_b = SqlSink(sessions, b)
    sink_b.on_trial_start("ste-w1a1-s0", {"device": "cpu", "attempt": 1})
    sink_b.on_epoch("ste-w1a1-s0", epoch_metrics(1))
    assert store.results_fingerprint(session, a) == ("queued", first)
    sink = SqlSink(sessions, a)
    sink.on_trial_start("ste-w1a1-s0", {"device": "cpu", "attempt": 1})
    after_start = store.results_fingerprint(session, a)[1]
    sink.on_epoch("ste-w1a1-s0", epoch_metrics(1))
    after_epoch = store.results_fingerprint(session, a)[1]
    assert len({first, after_start, after_epoch}) == 3


def test_a_report_archive_is_found_by_run_format_and_fingerprint(session):
    a, b = (store.create_run(session, make_spec(n))[0]["id"] for n in ("a", "b"))
    store.save_report_archive(session, a, False, "f1", b"html")
    store.save_report_archive(session, a, True, "f1", b"png")
    assert store.report_archive(session, a, False, "f1") == b"html"
    assert store.report_archive(session, a, True, "f1") == b"png"
    assert store.report_archive(session, a, False, "f2") is None
    assert store.report_archive(session, b, False, "f1") is None

"""Protocols (workers.protocol): the leaderboard never pools trials trained under different recipes,
and counts one trial per (estimator, bits, seed) within one protocol: on SQLite and PostgreSQL."""
from __future__ import annotations

import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from service import store
from service.db import make_engine, migrate, session_factory
from service.sink import SqlSink
from service.tables import runs, trials
from tests.test_api import make_api  # noqa: F401  (fixture)
from workers.protocol import PROTOCOL_VERSION, protocol
from workers.spec import parse_spec

pytestmark = pytest.mark.timeout(120)

BASE = {"name": "p", "estimators": ["ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0, 1], "epochs": 5,
        "include_full_precision": False}


def spec(**over):
    return parse_spec({**BASE, **over})


def of(s) -> str:
    return protocol(s.protocol_view()).id


# -- the identity ---------------------------------------------------------------------------------
def test_what_a_study_compares_is_not_part_of_the_protocol():
    same = [spec(), spec(name="other", description="x", seeds=[7], estimators=["aqe", "ste"],
                     bits=[{"w": 2, "a": 2}], include_full_precision=True, resources={"cpu": 4.0}, max_retries=0),
            spec(optimizer={"name": "adam", "lr": 0.01, "momentum": 0.5}),  # Adam ignores momentum
            spec(dataset_options={"val_size": None}),  # null: the data set's default, as absent
            spec(dataset_options={"split_seed": parse_spec(BASE).dataset_options.split_seed})]  # the default, given
    assert {of(s) for s in same} == {of(spec())}
    constant = spec(lr_schedule={"name": "constant"})
    assert of(spec(lr_schedule={"name": "constant", "gamma": 0.5})) == of(constant) != of(spec())  # gamma unused


@pytest.mark.parametrize("over", [
    {"epochs": 6}, {"batch_size": 64}, {"optimizer": {"name": "sgd", "lr": 0.01}}, {"optimizer": {"lr": 0.02}},
    {"optimizer": {"weight_decay": 1e-4}}, {"lr_schedule": {"name": "cosine"}}, {"lr_schedule": {"gamma": 0.9}},
    {"dataset_options": {"train_size": 500}}, {"dataset_options": {"split_seed": 3}}, {"first_last_float": True},
    {"bn_reestimate": True}, {"dataset": "mnist"}, {"model": "convnet_a"}])
def test_everything_that_changes_a_measurement_is(over):
    assert of(spec(**over)) != of(spec())


def test_model_options_are_part_of_the_protocol_and_their_defaults_are_not():
    """convnet_a at width_divisor 8 is another network than at 1 (given or not: the same)."""
    a = {"model": "convnet_a", "dataset": "synthetic"}
    ids = {d: of(spec(**a, model_options={"width_divisor": d})) for d in (1, 2, 8)}
    assert len(set(ids.values())) == 3 and ids[1] == of(spec(**a))
    s = spec(**a, model_options={"width_divisor": 8})
    assert protocol(s.protocol_view()).label.startswith("synthetic/convnet_a width_divisor 8 · 5 ep")


def test_label_reads_the_recipe_and_the_version_is_part_of_the_id():
    s = parse_spec({**BASE, "dataset": "fashion_mnist", "model": "fashion_net", "epochs": 10,
                    "lr_schedule": {"name": "cosine"}, "dataset_options": {"train_size": 20000}})
    assert protocol(s.model_dump(mode="json")).label == (
        "fashion_mnist/fashion_net · 10 ep · adam 0.01 cosine · bs 128 · 20k train")
    stored = s.model_dump(mode="json")
    assert protocol(stored, version=PROTOCOL_VERSION + 1).id != protocol(stored).id
    assert protocol(stored, version=PROTOCOL_VERSION + 1).label.endswith(f" · v{PROTOCOL_VERSION + 1}")


def test_the_protocol_and_the_migration_import_no_torch():
    code = ("import sys, importlib.util; import workers.protocol; "
            "spec = importlib.util.spec_from_file_location('m', 'service/migrations/versions/0008_protocol.py'); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_method_with_its_own_first_last_policy_has_its_own_protocol(session):
    """dorefa (the method) keeps first and last layers float: its trials are not ranked with the
    spec's estimators, whose layers are all quantized."""
    run, _ = store.create_run(session, spec(methods=[{"name": "dorefa", "bits": [{"w": 1, "a": 1}]}],
                                            include_full_precision=True))
    by_key = {t["key"]: t for t in store.list_trials(session, run["id"])}
    assert by_key["ste-w1a1-s0"]["protocol"] == by_key["float-w32a32-s0"]["protocol"] == run["protocol"]
    assert by_key["dorefa-w1a1-s0"]["protocol"] != run["protocol"]
    assert by_key["dorefa-w1a1-s0"]["protocol_label"] == run["protocol_label"] + " · first/last float"


# -- the leaderboard ------------------------------------------------------------------------------
def finish(sessions, run_id, accs: dict[str, float]) -> None:
    sink = SqlSink(sessions, run_id)
    for key, acc in accs.items():
        sink.on_trial_end(key, "done", {"final_test_acc": acc}, None)


@pytest.mark.parametrize("over", [{"epochs": 200}, {"optimizer": {"name": "sgd", "lr": 0.1}},
                                  {"dataset_options": {"train_size": 1000}}, {"first_last_float": True}])
def test_runs_that_differ_in_their_recipe_never_share_a_row(session, sessions, over):
    a = store.create_run(session, spec())[0]
    b = store.create_run(session, spec(**over))[0]
    finish(sessions, a["id"], {"ste-w1a1-s0": 0.60, "ste-w1a1-s1": 0.62})
    finish(sessions, b["id"], {"ste-w1a1-s0": 0.90, "ste-w1a1-s1": 0.92})
    board = store.leaderboard(session)
    assert sorted((r["protocol"], r["n"], round(r["mean"], 6), r["rank"]) for r in board) == sorted(
        [(a["protocol"], 2, 0.61, 1), (b["protocol"], 2, 0.91, 1)])
    assert {r["protocol_label"] for r in board} == {a["protocol_label"], b["protocol_label"]}
    only_b = store.leaderboard(session, protocol=b["protocol"])
    assert [(r["protocol"], r["mean"]) for r in only_b] == [(b["protocol"], pytest.approx(0.91))]


def test_the_same_seed_twice_in_one_protocol_counts_once_the_latest(session, sessions):
    """Two runs of one recipe both train seed 0: the later finished trial counts, the other is set aside."""
    first = store.create_run(session, spec())[0]
    second = store.create_run(session, spec(name="again", seeds=[0, 2]))[0]
    assert first["protocol"] == second["protocol"]
    finish(sessions, second["id"], {"ste-w1a1-s0": 0.50, "ste-w1a1-s2": 0.70})
    finish(sessions, first["id"], {"ste-w1a1-s0": 0.80, "ste-w1a1-s1": 0.90})
    [row] = store.leaderboard(session)
    assert (row["n"], row["set_aside"]) == (3, 1)
    assert row["mean"] == pytest.approx(statistics.mean([0.80, 0.90, 0.70]))  # seed 0 of the first run: latest
    assert row["std"] == pytest.approx(statistics.stdev([0.80, 0.90, 0.70]), rel=1e-6)
    # the second run's seed 0 finishes again, later: now it counts
    later = datetime.now(UTC) + timedelta(minutes=5)
    session.execute(update(trials).where(trials.c.run_id == second["id"], trials.c.key == "ste-w1a1-s0")
                    .values(finished_at=later))
    session.commit()
    [row] = store.leaderboard(session)
    assert (row["n"], row["set_aside"], row["mean"]) == (3, 1, pytest.approx(statistics.mean([0.50, 0.90, 0.70])))
    # one run alone has no repeats
    assert [(r["n"], r["set_aside"]) for r in store.leaderboard(session, run_id=first["id"])] == [(2, 0)]


def test_protocols_lists_the_choices_of_a_dataset(session, sessions):
    a = store.create_run(session, spec())[0]
    b = store.create_run(session, spec(epochs=50))[0]
    c = store.create_run(session, spec(dataset="mnist"))[0]
    for run in (a, b, c):
        finish(sessions, run["id"], {"ste-w1a1-s0": 0.5})
    assert store.protocols(session, dataset="digits", model="digits_net") == sorted(
        [(a["protocol"], a["protocol_label"]), (b["protocol"], b["protocol_label"])], key=lambda p: p[1])
    assert store.protocols(session) == sorted(
        [(r["protocol"], r["protocol_label"]) for r in (a, b, c)], key=lambda p: p[1])


# -- the migration ----------------------------------------------------------------------------------
def test_migration_0006_computes_the_protocol_of_stored_runs(db_url):
    """Runs stored before 0006 get the protocol a new run of their spec got at protocol version 1 (the
    definitions they were trained with); a method trial its own. A new run of the spec today is version 2."""
    with_method = spec(methods=[{"name": "dorefa", "bits": [{"w": 1, "a": 1}]}])
    old = {"plain": spec(), "sgd": spec(optimizer={"name": "sgd", "lr": 0.1}), "method": with_method}
    eng = make_engine(db_url)
    migrate(eng, "0005")
    with eng.begin() as conn:
        for name, s in old.items():
            stored = s.model_dump(mode="json")
            rid = conn.execute(runs.insert().values(
                name=name, status="done", dataset=s.dataset, model=s.model, spec=stored, spec_hash=s.spec_hash(),
                created_at=datetime.now(), trial_count=len(s.trials())).returning(runs.c.id)).scalar_one()
            conn.execute(trials.insert(), [
                {"run_id": rid, "key": t.key, "estimator": t.estimator, "estimator_label": t.label,
                 "estimator_params": {}, "w_bits": t.w_bits, "a_bits": t.a_bits, "seed": t.seed, "status": "done"}
                for t in s.trials()])
    migrate(eng)
    with session_factory(eng)() as s:
        for name, sp in old.items():
            run = next(r for r in store.list_runs(s, limit=10)[0] if r["name"] == name)
            fresh = store.create_run(s, sp.model_copy(update={"name": name + "-new"}))[0]
            v1 = protocol(sp.model_dump(mode="json"), version=1)
            assert (run["protocol"], run["protocol_label"]) == (v1.id, v1.label)
            assert run["protocol_label"] == fresh["protocol_label"] + " · v1" and run["protocol"] != fresh["protocol"]
            got = {t["key"]: t["protocol"] for t in store.list_trials(s, run["id"])}
            fresh_got = {t["key"]: t["protocol"] for t in store.list_trials(s, fresh["id"])}
            v1_of = {protocol(sp.model_dump(mode="json"), version=2).id: v1.id}
            for t in store.list_trials(s, fresh["id"]):  # a method trial's own protocol, at version 1
                if t["protocol"] not in v1_of:
                    v1_of[t["protocol"]] = protocol(sp.model_dump(mode="json"), first_last_float=True, version=1).id
            assert got == {key: v1_of[p] for key, p in fresh_got.items()}
    eng.dispose()


# -- the API ---------------------------------------------------------------------------------------
def test_get_leaderboard_by_protocol_and_a_malformed_one_is_a_422(make_api):  # noqa: F811
    api = make_api()
    short = api.post_run({**BASE, "epochs": 5})
    long = api.post_run({**BASE, "name": "long", "epochs": 200})
    for run, acc in ((short, 0.6), (long, 0.9)):
        sink = api.sink(run["id"])
        for seed in (0, 1):
            sink.on_trial_end(f"ste-w1a1-s{seed}", "done", {"final_test_acc": acc}, None)
    rows = api.get("/leaderboard").json()
    assert sorted((r["protocol_label"], r["n"], r["set_aside"]) for r in rows) == [
        ("digits/digits_net · 200 ep · adam 0.01 exp 0.98 · bs 128", 2, 0),
        ("digits/digits_net · 5 ep · adam 0.01 exp 0.98 · bs 128", 2, 0)]
    pid = api.get(f"/runs/{long['id']}").json()["protocol"]
    assert [(r["protocol"], r["mean"]) for r in api.get("/leaderboard", params={"protocol": pid}).json()] == [
        (pid, pytest.approx(0.9))]
    for bad in ("xyz", pid.upper(), pid + "0", "' OR 1=1 --"):
        r = api.get("/leaderboard", params={"protocol": bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "protocol"], bad


def test_the_leaderboard_page_chooses_a_protocol_and_says_what_it_set_aside(make_api):  # noqa: F811
    api = make_api()
    short = api.post_run({**BASE, "epochs": 5})
    again = api.post_run({**BASE, "name": "again", "epochs": 5, "seeds": [0]})
    long = api.post_run({**BASE, "name": "long", "epochs": 200})
    for run, acc in ((short, 0.6), (again, 0.65), (long, 0.9)):
        for key in [t["key"] for t in api.trials(run["id"])]:
            api.sink(run["id"]).on_trial_end(key, "done", {"final_test_acc": acc}, None)
    ids = {name: api.get(f"/runs/{r['id']}").json()["protocol"] for name, r in (("short", short), ("long", long))}
    page = api.get("/dashboard/leaderboard", params={"dataset": "digits", "model": "digits_net",
                                                    "protocol": ids["long"]}).text
    options = re.findall(r'<option value="([0-9a-f]{16})"( selected)?>([^<]*)</option>', page)
    recipe = "adam 0.01 exp 0.98 · bs 128"
    assert sorted(options) == sorted([(ids["long"], " selected", f"digits/digits_net · 200 ep · {recipe}"),
                                      (ids["short"], "", f"digits/digits_net · 5 ep · {recipe}")])
    assert 'id="leaderboard-set-aside"' not in page and f'data-protocol="{ids["long"]}"' in page
    page = api.get("/dashboard/leaderboard", params={"dataset": "digits", "model": "digits_net",
                                                    "protocol": ids["short"]}).text
    assert 'data-set-aside="1"' in page and "1 repeat set aside" in page
    assert re.findall(r'data-estimator="([^"]*)"', page) == ["ste"]
    fallback = api.get("/dashboard/leaderboard", params={"protocol": "nope"}).text  # unknown: the first by label
    assert re.search(r'<option value="[0-9a-f]{16}" selected>digits/digits_net · 200 ep', fallback)


def test_the_report_names_the_run_protocol_and_a_method_protocol_of_its_own(session, sessions, tmp_path):
    from service.report import build_report

    run = store.create_run(session, spec(methods=[{"name": "dorefa", "bits": [{"w": 1, "a": 1}]}]))[0]
    finish(sessions, run["id"], {"ste-w1a1-s0": 0.6, "ste-w1a1-s1": 0.7, "dorefa-w1a1-s0": 0.8, "dorefa-w1a1-s1": 0.8})
    md = build_report(session, run["id"], tmp_path / "r", png=False)["RESULTS.md"].read_text()
    assert f"Protocol: {run['protocol_label']} (`{run['protocol']}`);\na named method's own: " \
           f"{run['protocol_label']} · first/last float" in md
    # one table per protocol at W1A1, each with its own rank 1
    assert "### W1A1 · digits/digits_net · 5 ep · adam 0.01 exp 0.98 · bs 128\n" in md
    assert "### W1A1 · digits/digits_net · 5 ep · adam 0.01 exp 0.98 · bs 128 · first/last float\n" in md
    page = store.get_run(session, run["id"])
    from dashboard import pages
    body = pages.render_main(pages.report_page(page, store.list_trials(session, run["id"]),
                                               store.run_results(session, run["id"])))
    assert f'data-protocol="{run["protocol"]}">{run["protocol_label"]}<' in body


def test_a_report_of_runs_of_one_protocol_ranks_them_together(session, sessions):
    """A study's two runs of one protocol (e.g. own grids and one shared grid): one leaderboard over both, a seed
    both trained counts once (the latest), and another run of the protocol stays out of it."""
    from service.report import load_study_records

    a = store.create_run(session, spec(estimators=["ste", "aqe"]))[0]
    b = store.create_run(session, spec(estimators=["ste"], seeds=[1, 2]))[0]
    other = store.create_run(session, spec(estimators=["ste"], seeds=[5]))[0]
    finish(sessions, a["id"], {"ste-w1a1-s0": 0.60, "ste-w1a1-s1": 0.62, "aqe-w1a1-s0": 0.7, "aqe-w1a1-s1": 0.7})
    finish(sessions, b["id"], {"ste-w1a1-s1": 0.64, "ste-w1a1-s2": 0.66})
    finish(sessions, other["id"], {"ste-w1a1-s5": 0.10})
    records = load_study_records(session, [a["id"], b["id"]])
    rows = {r["estimator_label"]: r for r in records["leaderboard"]}
    assert set(rows) == {"ste", "aqe"} and {r["protocol"] for r in rows.values()} == {a["protocol"]}
    assert (rows["ste"]["n"], rows["ste"]["set_aside"]) == (3, 1)
    assert rows["ste"]["mean"] == pytest.approx((0.60 + 0.64 + 0.66) / 3) and rows["aqe"]["rank"] == 1
    assert [r["seed"] for r in records["trials"] if r["estimator_label"] == "ste"] == [0, 1, 1, 2]

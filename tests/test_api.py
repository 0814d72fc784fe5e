"""The HTTP API over a real database (SQLite file and PostgreSQL through ``db_url``)."""
from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import estimators
from service import store
from service.app import create_app
from service.config import Settings
from service.db import current_revision
from service.demo import DEMO_SPEC, demo_spec
from service.sink import SqlSink
from workers.datasets import list_datasets
from workers.models import list_models
from workers.spec import ALLOWED_BITS, parse_spec

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"


def small_spec(name: str = "api-test", **over) -> dict:
    """2 estimators × 2 bit cells × 2 seeds + float = 10 trials."""
    return {"name": name, "estimators": ["aqe", {"name": "ste"}], "bits": {"w": [1, 2], "a": 1},
            "seeds": [0, 1], "epochs": 3, **over}


def epoch_metrics(epoch: int, acc: float = 0.5) -> dict:
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc, "val_acc": acc, "test_acc": acc,
            "lr": 0.01, "epoch_seconds": 0.1, "images_per_s": 1000.0, "device": "cpu",
            "schedule": {"aqe.alpha": 0.5 + epoch / 10}}


class Api:
    """A TestClient over ``create_app(settings)`` plus direct store access to the same database."""

    def __init__(self, client: TestClient):
        self.client = client
        self.sessions = client.app.state.session_factory

    def __getattr__(self, name):  # get, post, … of the client
        return getattr(self.client, name)

    def counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return store.count_rows(s)

    def sink(self, run_id: int) -> SqlSink:
        return SqlSink(self.sessions, run_id)

    def trials(self, run_id: int) -> list[dict]:
        with self.sessions() as s:
            return store.list_trials(s, run_id)

    def post_run(self, body: dict | None = None, **kwargs) -> dict:
        r = self.client.post("/runs", json=body or small_spec(), **kwargs)
        assert r.status_code == 202, r.text
        return r.json()

    def finish_trial(self, run_id: int, key: str, accs: list[float]) -> None:
        """Report a trial through the SQL sink: start, one epoch per accuracy, done."""
        sink = self.sink(run_id)
        sink.on_trial_start(key, {"device": "cpu", "attempt": 1})
        for epoch, acc in enumerate(accs, 1):
            sink.on_epoch(key, epoch_metrics(epoch, acc))
        sink.on_trial_end(key, "done", {"final_test_acc": accs[-1], "final_val_acc": accs[-1],
                                        "best_val_acc": max(accs), "best_epoch": len(accs), "epochs": len(accs)},
                          None)


@pytest.fixture
def make_api(db_url):
    """``make_api(**settings)`` → an :class:`Api` on the test database (lifespan: migrated)."""
    with ExitStack() as stack:
        def make(**overrides) -> Api:
            settings = Settings(database_url=db_url, **{"api_token": None, "max_trials": 2000, **overrides})
            return Api(stack.enter_context(TestClient(create_app(settings))))

        yield make


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


# -- POST /runs -------------------------------------------------------------------------------
def test_post_run_queues_the_grid(api):
    r = api.post("/runs", json=small_spec())
    assert r.status_code == 202
    body = r.json()
    assert body["status"] == "queued" and body["trial_count"] == 10
    assert r.headers["location"] == body["location"] == f"/runs/{body['id']}"
    assert api.counts() == {"runs": 1, "trials": 10, "metrics": 0}
    expected = parse_spec(small_spec())
    assert [t["key"] for t in api.trials(body["id"])] == [t.key for t in expected.trials()]

    run = api.get(r.headers["location"]).json()
    assert run["status"] == "queued" and run["spec_hash"] == expected.spec_hash()
    assert run["spec"]["optimizer"] == {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9,
                                        "nesterov": False}  # defaults filled
    assert run["progress"] == {"done": 0, "running": 0, "queued": 10, "failed": 0, "cancelled": 0}
    assert run["epochs"] == {"done": 0, "total": 30} and run["current_epochs"] == {}


def test_idempotency_key(api):
    first = api.post("/runs", json=small_spec(), headers={"Idempotency-Key": "k1"})
    again = api.post("/runs", json=small_spec(), headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert api.counts()["runs"] == 1

    other = api.post("/runs", json=small_spec(epochs=4), headers={"Idempotency-Key": "k1"})
    assert other.status_code == 422
    [err] = other.json()["detail"]
    assert err["loc"] == ["header", "Idempotency-Key"] and "different spec" in err["msg"]
    assert api.counts() == {"runs": 1, "trials": 10, "metrics": 0}

    assert api.post("/runs", json=small_spec()).json()["id"] != first.json()["id"]  # no key: a new run
    assert api.counts()["runs"] == 2


def test_writes_need_the_token_when_one_is_set(make_api):
    api = make_api(api_token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = api.post("/runs", json=small_spec(), headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["detail"][0]["loc"] == ["header", "Authorization"]
    assert api.counts()["runs"] == 0

    auth = {"Authorization": f"Bearer {TOKEN}"}
    run = api.post_run(headers=auth)
    assert api.post(f"/runs/{run['id']}/cancel", json={}).status_code == 401
    assert api.post(f"/runs/{run['id']}/cancel", json={}, headers=auth).json()["status"] == "cancelled"
    for path in ("/runs", f"/runs/{run['id']}", f"/runs/{run['id']}/trials", "/leaderboard", "/catalog",
                 f"/runs/{run['id']}/export", "/healthz", "/dashboard/"):
        assert api.get(path).status_code == 200, path  # reads stay open


@pytest.mark.parametrize("token", [None, TOKEN])
def test_cross_site_writes_are_refused_token_or_not(make_api, token):
    """A browser on another site can POST a form or text/plain without a CORS preflight, and can't
    leave out ``Origin``: writes take only application/json and only from this service's own pages
    (or a configured origin)."""
    api = make_api(api_token=token, allowed_origins=["https://lab.example.org"])
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    run = api.post_run(headers=auth)
    body = json.dumps(small_spec("cross-site"))
    before = api.counts()

    def refused(code, loc, url="/runs", **kwargs):
        r = api.post(url, **{**kwargs, "headers": {**auth, **kwargs.get("headers", {})}})
        assert r.status_code == code, r.text
        assert r.json()["detail"][0]["loc"] == loc
        return r.json()["detail"][0]["msg"]

    evil = {"Origin": "https://evil.example"}
    assert "'https://evil.example' is refused" in refused(403, ["header", "Origin"], content=body,
                                                             headers={**evil, "Content-Type": "text/plain"})
    refused(403, ["header", "Origin"], json=small_spec(), headers=evil)
    refused(403, ["header", "Origin"], json=small_spec(), headers={"Origin": "null"})  # a sandboxed page
    refused(403, ["header", "Origin"], json=small_spec(), headers={"Origin": "http://testserver:8080"})
    refused(403, ["header", "Origin"], url=f"/runs/{run['id']}/cancel", json={}, headers=evil)
    assert "not 'text/plain'" in refused(415, ["header", "Content-Type"], content=body,
                                         headers={"Content-Type": "text/plain;charset=UTF-8"})
    refused(415, ["header", "Content-Type"], data={"name": "form"})
    refused(415, ["header", "Content-Type"], content=body, headers={"Content-Type": "multipart/form-data"})
    assert "no Content-Type" in refused(415, ["header", "Content-Type"], url=f"/runs/{run['id']}/cancel")
    assert api.counts() == before and api.get(f"/runs/{run['id']}").json()["status"] == "queued"

    for origin in ("http://testserver", "HTTP://TESTSERVER:80", "https://lab.example.org"):  # its own; allowed
        assert api.post("/runs", json=small_spec(origin), headers={**auth, "Origin": origin}).status_code == 202
    r = api.post(f"/runs/{run['id']}/cancel", content=b"{}", headers={**auth, "Origin": "http://testserver",
                                                                       "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_method_not_allowed_names_every_method_of_the_path(api):
    for method, path, allow in [("options", "/runs", "GET, POST"), ("delete", "/runs", "GET, POST"),
                                ("put", "/runs/1", "GET"), ("get", "/runs/1/cancel", "POST")]:
        r = api.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers.get("allow"))
        assert r.json() == {"detail": "Method Not Allowed"}


def test_allowed_origins_setting():
    settings = Settings(allowed_origins="https://lab.example.org, http://10.0.0.5:8000")
    assert settings.allowed_origins == ["https://lab.example.org:443", "http://10.0.0.5:8000"]
    with pytest.raises(ValueError, match="not an origin"):
        Settings(allowed_origins="https://lab.example.org/dashboard")


def test_list_runs_filters_and_pages(api):
    ids = [api.post_run(small_spec(f"r{i}"))["id"] for i in range(5)]
    synthetic = api.post_run(small_spec("syn", dataset="synthetic"))["id"]
    api.post(f"/runs/{ids[0]}/cancel", json={})

    page = api.get("/runs", params={"limit": 2}).json()
    assert page["total"] == 6 and page["limit"] == 2 and page["offset"] == 0
    assert [r["id"] for r in page["items"]] == [synthetic, ids[4]]  # newest first
    pages = [api.get("/runs", params={"limit": 2, "offset": off}).json()["items"] for off in range(0, 6, 2)]
    seen = [r["id"] for page in pages for r in page]
    assert sorted(seen) == sorted([*ids, synthetic])
    assert api.get("/runs", params={"offset": 6}).json()["items"] == []

    assert [r["id"] for r in api.get("/runs", params={"status": "cancelled"}).json()["items"]] == [ids[0]]
    assert api.get("/runs", params={"status": "queued"}).json()["total"] == 5
    assert [r["id"] for r in api.get("/runs", params={"dataset": "synthetic"}).json()["items"]] == [synthetic]
    assert api.get("/runs", params={"model": "digits_net", "dataset": "digits"}).json()["total"] == 5
    assert api.get("/runs", params={"model": "resnet20"}).json() == {"items": [], "total": 0, "limit": 50,
                                                                     "offset": 0}


def test_run_progress_trials_and_metrics(api):
    run = api.post_run()
    trials = {t["key"]: t for t in api.trials(run["id"])}
    api.finish_trial(run["id"], "float-w32a32-s0", [0.5, 0.7, 0.9])
    sink = api.sink(run["id"])
    sink.on_trial_start("aqe-w1a1-s0", {"device": "cpu", "attempt": 1})
    sink.on_epoch("aqe-w1a1-s0", epoch_metrics(1))
    sink.on_epoch("aqe-w1a1-s0", epoch_metrics(1))  # a repeat is stored once
    assert api.counts()["metrics"] == 4

    detail = api.get(f"/runs/{run['id']}").json()
    assert detail["progress"] == {"done": 1, "running": 1, "queued": 8, "failed": 0, "cancelled": 0}
    assert detail["epochs"] == {"done": 4, "total": 30}
    assert detail["current_epochs"] == {"aqe-w1a1-s0": 1}

    listed = api.get(f"/runs/{run['id']}/trials").json()
    assert [t["key"] for t in listed] == list(trials)
    done = next(t for t in listed if t["key"] == "float-w32a32-s0")
    assert done["status"] == "done" and done["final_test_acc"] == 0.9 and done["epochs_done"] == 3

    trial = api.get(f"/trials/{done['id']}").json()
    assert [m["epoch"] for m in trial["metrics"]] == [1, 2, 3]
    assert [m["test_acc"] for m in trial["metrics"]] == [0.5, 0.7, 0.9]
    assert trial["metrics"][0]["schedule"] == {"aqe.alpha": 0.6} and trial["device"] == "cpu"


def test_cancel(api):
    queued = api.post_run()
    r = api.post(f"/runs/{queued['id']}/cancel", json={})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert r.json()["progress"]["cancelled"] == 10

    running = api.post_run(small_spec("running"))
    with api.sessions() as s:
        assert store.claim_run(s, "test-worker")["id"] == running["id"]
    r = api.post(f"/runs/{running['id']}/cancel", headers={"Content-Type": "application/json"})  # empty body
    assert r.status_code == 202 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    with api.sessions() as s:
        assert store.cancel_requested(s, running["id"])


def test_export_csv_and_json(api):
    run = api.post_run()
    api.finish_trial(run["id"], "float-w32a32-s0", [0.5, 0.6])
    api.finish_trial(run["id"], "aqe-w1a1-s1", [0.3, 0.4, 0.45])

    r = api.get(f"/runs/{run['id']}/export")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == f'attachment; filename="bitbench-run-{run["id"]}.csv"'
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 5
    assert {"trial_key", "epoch", "test_acc", "w_bits", "a_bits", "seed", "schedule.aqe.alpha"} <= set(rows[0])

    j = api.get(f"/runs/{run['id']}/export", params={"format": "json"})
    assert j.status_code == 200 and j.headers["content-disposition"].endswith(f'{run["id"]}.json"')
    data = j.json()
    assert len(data) == len(rows)
    for from_csv, from_json in zip(rows, data, strict=False):
        assert from_csv == {k: "" if from_json.get(k) is None else str(from_json[k]) for k in from_csv}
    assert [(d["trial_key"], d["epoch"], d["test_acc"]) for d in data][-1] == ("aqe-w1a1-s1", 3, 0.45)

    empty = api.post_run(small_spec("nothing yet"))
    r = api.get(f"/runs/{empty['id']}/export")
    assert r.status_code == 200 and r.text.splitlines()[0].startswith("run_id,trial_key,")
    assert len(r.text.splitlines()) == 1


def test_leaderboard_after_finished_trials(api):
    run = api.post_run()
    accs = {("aqe", 0): 0.90, ("aqe", 1): 0.80, ("ste", 0): 0.70, ("ste", 1): 0.60}
    for (est, seed), acc in accs.items():
        api.finish_trial(run["id"], f"{est}-w1a1-s{seed}", [acc / 2, acc])
    api.finish_trial(run["id"], "aqe-w2a1-s0", [0.95])

    rows = api.get("/leaderboard", params={"dataset": "digits", "model": "digits_net"}).json()
    w1a1 = [r for r in rows if (r["w_bits"], r["a_bits"]) == (1, 1)]
    assert [(r["estimator_label"], r["rank"], r["best"], r["n"]) for r in w1a1] == [
        ("aqe", 1, True, 2), ("ste", 2, False, 2)]
    assert w1a1[0]["mean"] == pytest.approx(0.85) and w1a1[0]["std"] == pytest.approx(0.0707107, rel=1e-4)
    assert w1a1[0]["ci_low"] < 0.85 < w1a1[0]["ci_high"]
    single = next(r for r in rows if (r["w_bits"], r["a_bits"]) == (2, 1))
    assert single["n"] == 1 and single["std"] is None and single["ci_low"] is None
    assert api.get("/leaderboard").json() == rows
    assert api.get("/leaderboard", params={"dataset": "cifar10"}).json() == []
    assert api.get("/leaderboard", params={"run_id": run["id"]}).json() == rows
    other = api.post_run(small_spec("other"))
    api.finish_trial(other["id"], "ste-w1a1-s0", [0.99])
    assert [r["n"] for r in api.get("/leaderboard", params={"run_id": other["id"]}).json()] == [1]
    assert api.get("/leaderboard", params={"run_id": run["id"]}).json() == rows


def test_report_zip(api):
    run = api.post_run()
    for seed, acc in ((0, 0.9), (1, 0.8)):
        api.finish_trial(run["id"], f"aqe-w1a1-s{seed}", [acc - 0.1, acc])
        api.finish_trial(run["id"], f"ste-w1a1-s{seed}", [acc - 0.2, acc - 0.1])
    r = api.get(f"/runs/{run['id']}/report", params={"png": False})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["content-disposition"] == f'attachment; filename="bitbench-run-{run["id"]}.zip"'
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        names = z.namelist()
        assert all(n.startswith(f"bitbench-run-{run['id']}/") for n in names)
        assert {"RESULTS.md", "leaderboard.tex", "spec.json"} <= {n.split("/", 1)[1] for n in names}
        assert "api-test" in z.read(f"bitbench-run-{run['id']}/RESULTS.md").decode()


def test_catalog(api):
    cat = api.get("/catalog").json()
    assert [e["name"] for e in cat["estimators"]] == estimators.list_estimators()
    aqe = next(e for e in cat["estimators"] if e["name"] == "aqe")
    assert aqe["params"]["backward"]["choices"] == ["eq18", "alg1", "autodiff"] and "α" in aqe["formula"]
    assert cat["models"] == list_models() and "digits_net" in cat["models"]
    assert cat["datasets"] == list_datasets() and "digits" in cat["datasets"]
    assert cat["bits"] == list(ALLOWED_BITS) and cat["max_trials"] == 2000


def test_healthz(api):
    r = api.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": api.client.app.state.engine.dialect.name,
                        "schema_version": current_revision(api.client.app.state.engine)}


def test_unknown_ids_are_404(make_api):
    api = make_api(api_token=TOKEN)
    for method, path, param in [("get", "/runs/999", "run_id"), ("get", "/runs/999/trials", "run_id"),
                                ("get", "/runs/999/export", "run_id"), ("post", "/runs/999/cancel", "run_id"),
                                ("get", "/runs/999/report", "run_id"),
                                ("get", "/trials/999", "trial_id")]:
        body = {} if method == "post" else None
        r = api.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"}, json=body)
        assert r.status_code == 404, path
        [err] = r.json()["detail"]
        assert err["loc"] == ["path", param] and err["msg"].endswith("999 not found")


def test_dashboard_answers_ids_past_the_tables_with_its_404_page(api):
    for n in (2**31, 2**63):
        for path, what in [(f"/dashboard/runs/{n}", "run"), (f"/dashboard/runs/{n}/report.html", "run"),
                           (f"/dashboard/trials/{n}", "trial")]:
            r = api.get(path)
            assert r.status_code == 404 and f"There is no {what} {n}." in r.text, path
        page = api.get(f"/dashboard/?offset={n}")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_docs_and_redoc_load_nothing_from_other_hosts(api):
    """Every script, stylesheet and icon of /docs and /redoc is served by the app itself."""
    for page, needed in [("/docs", {"swagger-ui-bundle.js", "swagger-ui.css"}), ("/redoc", {"redoc.standalone.js"})]:
        r = api.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert not re.findall(r"(?:https?:)?//[\w.-]+", r.text), page  # no host named anywhere in the page
        assets = re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', r.text)
        assert needed <= {a.rsplit("/", 1)[-1] for a in assets}, assets
        for url in assets:
            got = api.get(url)
            assert got.status_code == 200 and len(got.content) > 1000, url
            kind = {"js": "javascript", "css": "text/css", "png": "image/png"}[url.rsplit(".", 1)[-1]]
            assert kind in got.headers["content-type"], (url, got.headers["content-type"])
            if kind == "javascript":  # what the scripts fetch when they run: ReDoc's logo was a CDN's
                assert "cdn.redoc.ly" not in got.text and "cdn.jsdelivr.net" not in got.text, url
        assert "'/openapi.json'" in r.text or '"/openapi.json"' in r.text


def test_docs_openapi_and_root(api):
    assert api.get("/docs").status_code == 200
    schema = api.get("/openapi.json").json()
    body = schema["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ExperimentSpec"}
    components = schema["components"]["schemas"]
    refs = {m for m in json.dumps(schema).split('"') if m.startswith("#/components/schemas/")}
    assert {r.rsplit("/", 1)[1] for r in refs} <= set(components)  # every reference resolves
    assert "HTTPBearer" in schema["components"]["securitySchemes"]

    r = api.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/dashboard"
    run = api.post_run(small_spec("shown on the dashboard"))
    page = api.get("/")
    assert page.status_code == 200 and "shown on the dashboard" in page.text
    assert api.get(f"/dashboard/runs/{run['id']}").status_code == 200


def test_dashboard_source(api):
    from service.api.dashboard_source import StoreSource

    source = StoreSource(api.sessions)
    run = api.post_run()
    api.finish_trial(run["id"], "aqe-w1a1-s0", [0.8])
    items, total = source.list_runs(status="queued", limit=10, offset=0)
    assert total == 1 and items[0]["id"] == run["id"]
    assert source.get_run(run["id"])["progress"]["done"] == 1 and source.get_run(12345) is None
    assert len(source.list_trials(run["id"])) == 10
    [done] = source.run_results(run["id"])
    assert source.get_trial(done["id"])["metrics"][0]["test_acc"] == 0.8
    assert source.leaderboard("digits", "digits_net")[0]["estimator_label"] == "aqe"
    assert source.datasets_models() == [("digits", "digits_net")]


# -- the demo that `make run` queues -----------------------------------------------------------
def test_demo_spec_matches_the_study_file():
    spec = demo_spec()
    assert spec.trial_count() == 63 and (spec.dataset, spec.model) == ("digits", "digits_net")
    assert [e.name for e in spec.estimators] == ["aqe", "ste", "clipped_ste", "dorefa", "approx_sign"]
    assert spec.bit_cells() == [(1, 1), (1, 2), (2, 2), (3, 3)] and spec.include_full_precision
    on_disk = json.loads((ROOT / "studies" / "demo_digits.json").read_text())
    assert on_disk == DEMO_SPEC and parse_spec(on_disk).spec_hash() == spec.spec_hash()


def test_queue_demo_once(api):
    from service.run import queue_demo

    run, created = queue_demo(api.sessions)
    assert created and run["trial_count"] == 63
    assert queue_demo(api.sessions) == (run, False)
    assert api.counts() == {"runs": 1, "trials": 63, "metrics": 0}

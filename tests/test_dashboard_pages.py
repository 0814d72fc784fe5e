"""Dashboard pages over an in-memory FakeSource (no database, no service import)."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from itertools import count

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from plotly.offline import get_plotlyjs

from dashboard import create_router
from dashboard.figures import bit_config, config_label

SCRIPT_NAME = "<script>alert(1)</script>"
ESTIMATORS = ("aqe", "ste", "ewgs")
BIT_CONFIGS = ((1, 1), (1, 2), (2, 2))
SEEDS = (0, 1)


class FakeSource:
    """In-memory records in the shapes of docs/CONTRACTS.md, with the dashboard's source methods."""

    def __init__(self, runs: list[dict], trials: list[dict]):
        self.runs = {r["id"]: r for r in runs}
        self.trials = {t["id"]: t for t in trials}

    def list_runs(self, status=None, dataset=None, model=None, limit=50, offset=0):
        runs = [r for r in sorted(self.runs.values(), key=lambda r: -r["id"])
                if status in (None, r["status"]) and dataset in (None, r["dataset"]) and model in (None, r["model"])]
        return runs[offset:offset + limit], len(runs)

    def get_run(self, run_id):
        return self.runs.get(run_id)

    def list_trials(self, run_id, limit=None, offset=0):
        rows = [{k: v for k, v in t.items() if k != "metrics"} for t in self.trials.values() if t["run_id"] == run_id]
        return rows[offset:None if limit is None else offset + limit]

    def get_trial(self, trial_id):
        trial = self.trials.get(trial_id)
        return None if trial is None else {**trial, "metrics": list(trial.get("metrics", []))}

    def run_results(self, run_id):
        return [t for t in self.list_trials(run_id) if t["status"] == "done"]

    def run_leaderboard(self, run_id, metric="final"):
        run = self.runs[run_id]
        return FakeSource([run], self.run_results(run_id)).leaderboard(run["dataset"], run["model"], metric=metric)

    def datasets_models(self):
        return sorted({(r["dataset"], r["model"]) for r in self.runs.values()
                       if any(t["status"] == "done" for t in self.run_results(r["id"]))})

    def protocols(self, dataset, model):
        """One protocol per (dataset, model) here."""
        known = (dataset, model) in self.datasets_models()
        return [(f"{dataset}-{model}", f"{dataset}/{model} · 3 ep")] if known else []

    def leaderboard(self, dataset, model, protocol=None, metric="final"):
        assert protocol in (None, *(p for p, _ in self.protocols(dataset, model)))
        field = {"final": "final_test_acc", "selected": "selected_test_acc"}[metric]
        groups = defaultdict(list)
        for run in self.runs.values():
            if (run["dataset"], run["model"]) == (dataset, model):
                for t in self.run_results(run["id"]):
                    if t.get(field) is not None:
                        groups[(t["w_bits"], t["a_bits"], t["estimator_label"])].append(t[field])
        rows = []
        for (w, a, label), accs in groups.items():
            mean = statistics.fmean(accs)
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append({"dataset": dataset, "model": model, "w_bits": w, "a_bits": a, "estimator_label": label,
                         "metric": metric, "n": len(accs), "mean": mean, "std": std, "ci_low": mean - 2 * std,
                         "ci_high": mean + 2 * std, "packed_bytes": 3584 * w if w < 32 else None,
                         "packed_agreement": 0.999 if w < 32 else None})
        rows.sort(key=lambda r: (r["w_bits"] + r["a_bits"], r["w_bits"], -r["mean"]))
        for _, group in _groupby(rows, lambda r: (r["w_bits"], r["a_bits"])):
            for rank, r in enumerate(group, 1):
                r.update(rank=rank, best=rank == 1)
        return rows


def _groupby(rows, key):
    groups = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return groups.items()


def make_run(run_id, name, status="done", dataset="cifar10", model="convnet_a", trials=()):
    progress = {s: sum(t["status"] == s for t in trials) for s in ("done", "running", "queued", "failed", "cancelled")}
    return {"id": run_id, "name": name, "status": status, "dataset": dataset, "model": model,
            "spec": {"name": name, "dataset": dataset, "model": model, "epochs": 3},
            "spec_hash": "ab12cd34ef56ab12", "created_at": "2025-05-01T12:00:00", "started_at": "2025-05-01T12:00:05",
            "finished_at": "2025-05-01T12:30:00" if status == "done" else None, "error": None,
            "trial_count": len(trials), "progress": progress}


def make_trial(trial_id, run_id, estimator, w_bits, a_bits, seed, acc, status="done", label=None, epochs=3):
    metrics = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": acc * e / epochs, "val_acc": acc * e / epochs - 0.01,
                "test_acc": acc * e / epochs, "lr": 0.01 * 0.9 ** e, "epoch_seconds": 1.5, "images_per_s": 500.0,
                "device": "cpu", "schedule": {"aqe.alpha": e / epochs} if estimator == "aqe" else {}}
               for e in range(1, epochs + 1)] if status == "done" else []
    finished = status == "done"
    return {"id": trial_id, "run_id": run_id, "key": f"{estimator}-w{w_bits}a{a_bits}-s{seed}", "estimator": estimator,
            "estimator_label": label or estimator, "estimator_params": {}, "w_bits": w_bits, "a_bits": a_bits,
            "seed": seed, "status": status, "attempts": 1, "epochs_done": len(metrics),
            "final_test_acc": acc if finished else None, "final_val_acc": acc - 0.01 if finished else None,
            "best_val_acc": acc if finished else None, "device": "cpu", "started_at": "2025-05-01T12:01:00",
            "packed_bytes": 3584 * w_bits if finished and w_bits < 32 else None,
            "packed_agreement": 1.0 if finished and w_bits < 32 else None,
            "finished_at": "2025-05-01T12:05:00" if finished else None, "error": None, "metrics": metrics}


def demo_accuracy(estimator, w_bits, a_bits, seed):
    """Deterministic made-up accuracy: more bits and a better estimator score higher."""
    return round(0.80 + 0.02 * (w_bits + a_bits) + 0.01 * ESTIMATORS.index(estimator) + 0.004 * seed, 4)


def sample_source() -> FakeSource:
    """Run 1: finished, 3 estimators × 3 bit configs × 2 seeds + float. Run 2: running, hostile name."""
    ids = count(1)
    trials = [make_trial(next(ids), 1, e, w, a, s, demo_accuracy(e, w, a, s))
              for e in ESTIMATORS for (w, a) in BIT_CONFIGS for s in SEEDS]
    trials += [make_trial(next(ids), 1, "float", 32, 32, s, 0.92 + 0.002 * s) for s in SEEDS]
    hostile = [make_trial(next(ids), 2, "ste", 1, 1, 0, 0.7, label='<img src=x onerror="alert(2)">'),
               make_trial(next(ids), 2, "ste", 1, 1, 1, 0.0, status="running"),
               make_trial(next(ids), 2, "ste", 2, 2, 0, 0.0, status="queued")]
    runs = [make_run(1, "demo sweep", trials=trials),
            make_run(2, SCRIPT_NAME, status="running", dataset="cifar100", model="convnet_d", trials=hostile)]
    return FakeSource(runs, trials + hostile)


def make_app(source) -> FastAPI:
    """A bare app with the dashboard mounted the way the service mounts it."""
    app = FastAPI()
    app.include_router(create_router(source), prefix="/dashboard")
    return app


@pytest.fixture
def source():
    return sample_source()


@pytest.fixture
def client(source):
    with TestClient(make_app(source)) as c:
        yield c


def _first_done_trial(source, run_id=1):
    return next(t for t in source.trials.values() if t["run_id"] == run_id and t["status"] == "done")


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/", "/dashboard/?status=running", "/dashboard/runs/1",
                                  "/dashboard/runs/2", "/dashboard/leaderboard",
                                  "/dashboard/leaderboard?dataset=cifar100&model=convnet_d",
                                  "/dashboard/runs/1/report.html"])
def test_pages_ok(client, path):
    r = client.get(path)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/html")


def test_trial_page(client, source):
    trial = _first_done_trial(source)
    r = client.get(f"/dashboard/trials/{trial['id']}")
    assert r.status_code == 200
    assert 'id="training-curves"' in r.text and "aqe.alpha" in r.text
    assert r.text.count("<tr data-epoch=") == 3


@pytest.mark.parametrize("path", ["/dashboard/runs/999", "/dashboard/runs/999/report.html", "/dashboard/trials/999",
                                  "/dashboard/static/nope.js"])
def test_unknown_is_404(client, path):
    assert client.get(path).status_code == 404


def test_hostile_text_is_escaped(client):
    for path in ("/dashboard/", "/dashboard/runs/2", "/dashboard/runs/2/report.html", "/dashboard/trials/21",
                 "/dashboard/leaderboard?dataset=cifar100&model=convnet_d"):
        body = client.get(path).text
        assert SCRIPT_NAME not in body, path
        assert "<img src=x" not in body, path
    runs_page = client.get("/dashboard/").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in runs_page
    for path in ("/dashboard/runs/2", "/dashboard/leaderboard?dataset=cifar100&model=convnet_d"):
        assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in client.get(path).text, path


def _script_srcs(body):
    return re.findall(r'<script[^>]*\ssrc="([^"]*)"', body)


def test_plotly_served_locally(client):
    body = client.get("/dashboard/runs/1").text
    srcs = _script_srcs(body)
    assert any(s.startswith("/dashboard/static/plotly.min.js") for s in srcs)
    assert all(s.startswith("/dashboard/static/") for s in srcs)
    for path in ("/dashboard/", "/dashboard/runs/1", "/dashboard/leaderboard", "/dashboard/runs/1/report.html"):
        page = client.get(path).text
        if "report" not in path:  # the inlined bundle itself mentions cdn.plot.ly (geo topojson)
            assert "cdn.plot.ly" not in page
        assert not any(s.startswith(("http://", "https://", "//")) for s in _script_srcs(page))
    js = client.get(next(s for s in srcs if "plotly" in s))
    assert js.status_code == 200 and js.text == get_plotlyjs()
    assert "max-age=31536000" in js.headers["cache-control"]
    assert js.headers["content-type"].startswith("text/javascript")
    for name in ("dashboard.css", "dashboard.js"):
        assert client.get(f"/dashboard/static/{name}").status_code == 200


def test_standalone_report(client):
    r = client.get("/dashboard/runs/1/report.html")
    assert "attachment" in r.headers["content-disposition"]
    assert get_plotlyjs() in r.text
    assert 'id="acc-vs-bits"' in r.text and 'id="heatmap-0"' in r.text
    assert not _script_srcs(r.text)
    assert "/dashboard/trials/" not in r.text


def test_run_page_figures(client):
    body = client.get("/dashboard/runs/1").text
    assert 'id="acc-vs-bits"' in body and 'id="acc-vs-bits-spec"' in body
    assert body.count('class="heatmap"') == len(ESTIMATORS)
    assert body.count("<tr data-trial-id=") == len(ESTIMATORS) * len(BIT_CONFIGS) * len(SEEDS) + len(SEEDS)
    assert "paper, Table I, Model A" in body
    assert "data-live" not in body  # finished runs do not refresh


def test_live_refresh_while_running(client):
    body = client.get("/dashboard/runs/2").text
    assert '<main id="content" data-live=' in body
    partial = client.get("/dashboard/runs/2?partial=1").text
    assert partial.startswith("<main") and "<html" not in partial and "data-live" in partial
    assert "paper, Table II, Model D" in partial


def test_leaderboard_rows_follow_source(client, source):
    body = client.get("/dashboard/leaderboard?dataset=cifar10&model=convnet_a").text
    rows = re.findall(r'<tr class="entry[^"]*" data-rank="(\d+)" data-estimator="([^"]*)" data-bits="(\w+)" '
                      r'data-best="(\w+)"', body)
    expected = [(str(r["rank"]), r["estimator_label"], config_label(bit_config(r["w_bits"], r["a_bits"])),
                 str(r["best"]).lower())
                for r in source.leaderboard("cifar10", "convnet_a")]
    assert rows == expected
    assert body.count("★ best") == len(BIT_CONFIGS) + 1  # + float
    assert 'id="dataset-select"' in body and 'id="model-select"' in body


def test_leaderboard_falls_back_to_available_pair(client):
    body = client.get("/dashboard/leaderboard?dataset=cifar100&model=nope").text
    assert '<option value="convnet_d" selected>' in body


def test_runs_list(client):
    body = client.get("/dashboard/").text
    assert body.index('data-run-id="2"') < body.index('data-run-id="1"')
    assert 'href="/dashboard/runs/1"' in body and 'class="progress"' in body
    assert 'data-done="20" data-total="20"' in body
    filtered = client.get("/dashboard/?status=done").text
    assert 'data-run-id="1"' in filtered and 'data-run-id="2"' not in filtered
    assert 'href="/docs"' in body


def test_empty_source():
    with TestClient(make_app(FakeSource([], []))) as c:
        for path in ("/dashboard/", "/dashboard/leaderboard"):
            r = c.get(path)
            assert r.status_code == 200 and 'class="empty"' in r.text


def test_packed_export_size_and_agreement_are_shown(client, source):
    """Issue 7: the packed size and the engine's agreement appear on the run, trial and leaderboard pages."""
    trial = _first_done_trial(source)
    run_html = client.get("/dashboard/runs/1").text
    assert f"{3584 * trial['w_bits'] / 1024:.1f} KiB" in run_html and "100.00%" in run_html
    trial_html = client.get(f"/dashboard/trials/{trial['id']}").text
    assert "Packed export" in trial_html and f"{3584 * trial['w_bits'] / 1024:.1f} KiB" in trial_html
    board = client.get("/dashboard/leaderboard", params={"dataset": "cifar10", "model": "convnet_a"}).text
    assert "Packed agrees (min)" in board and "99.90%" in board and "3.5 KiB" in board

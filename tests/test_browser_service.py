"""The real service app in Debian's Chromium, over a small run trained by the real trainer.

The run is POSTed to the app, its trials are trained by ``workers.train.run_trial`` (no Ray:
the dispatcher's path is covered by test_e2e) and written by the real ``SqlSink``; the pages are
then read in the browser and checked against the API's own JSON.
"""
from __future__ import annotations

import httpx
import pytest
from test_browser import browser, page, plot_traces, problems, screenshot, serve  # noqa: F401  (fixtures)

from service import store
from service.app import create_app
from service.config import Settings
from service.sink import SqlSink
from workers.spec import parse_spec
from workers.train import run_trial

pytestmark = [pytest.mark.browser, pytest.mark.slow]

NAME = "<script>alert(1)</script>"
SPEC = {"name": NAME, "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"],
        "bits": [{"w": 1, "a": 1}, {"w": 2, "a": 2}], "seeds": [0], "epochs": 2}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "bitbench.sqlite"
    app = create_app(Settings(database_url=f"sqlite:///{db}", api_token=None))
    with serve(app) as url:
        run_id = httpx.post(f"{url}/runs", json=SPEC).json()["id"]
        sessions = app.state.session_factory
        sink = SqlSink(sessions, run_id)
        spec = parse_spec(SPEC)
        for trial in spec.trials():
            sink.on_trial_start(trial.key, {"device": "cpu", "attempt": 1})
            final = run_trial(spec, trial, on_epoch=lambda m, _s, k=trial.key: sink.on_epoch(k, m), threads=1)
            sink.on_trial_end(trial.key, "done", final, None)
        with sessions() as s:
            store.finish_run(s, run_id, "done")
        yield url, run_id


def test_run_page_of_the_real_app(page, served, problems, tmp_path):
    url, run_id = served
    page.goto(f"{url}/dashboard/runs/{run_id}")
    traces = [t for t in plot_traces(page, "acc-vs-bits") if t["kind"] == "estimator"]
    assert sorted(t["name"] for t in traces) == ["aqe", "ste"]
    assert all(t["x"] == ["W1A1", "W2A2"] for t in traces)
    trials = httpx.get(f"{url}/runs/{run_id}/trials").json()
    api = {(t["estimator_label"], t["w_bits"]): t["final_test_acc"] for t in trials}
    for t in traces:
        assert t["y"] == pytest.approx([api[(t["name"], 1)], api[(t["name"], 2)]])
    assert page.locator("#run-name").inner_text() == NAME  # shown as text, and no dialog fired
    screenshot(page, tmp_path / "service-run.png")
    assert not problems


def test_leaderboard_page_matches_the_api(page, served, problems):
    url, _ = served
    page.goto(f"{url}/dashboard/leaderboard?dataset=digits&model=digits_net")
    shown = page.eval_on_selector_all(
        "#leaderboard tr[data-rank]", "rows => rows.map(r => [r.dataset.estimator, r.dataset.bits])")
    api = httpx.get(f"{url}/leaderboard", params={"dataset": "digits", "model": "digits_net"}).json()
    expected = [[r["estimator_label"], "float" if r["w_bits"] == 32 else f"W{r['w_bits']}A{r['a_bits']}"] for r in api]
    assert shown == expected and len(shown) == 5
    assert not problems


def test_api_docs_draw_the_api_without_internet(page, served, problems):
    """Swagger UI and ReDoc draw every operation from the app's own assets; the ``page`` fixture
    aborts, and reports, any request that leaves loopback (a CDN)."""
    url, _ = served
    operations = {(method.upper(), path) for path, ops in httpx.get(f"{url}/openapi.json").json()["paths"].items()
                  for method in ops}
    page.goto(f"{url}/docs")
    page.wait_for_selector(".opblock-summary-path[data-path='/runs/{run_id}/cancel']")
    shown = page.eval_on_selector_all(".opblock", """els => els.map(e => [
        e.querySelector('.opblock-summary-method').innerText,
        e.querySelector('.opblock-summary-path').dataset.path])""")
    assert {tuple(s) for s in shown} == operations
    page.goto(f"{url}/redoc")
    page.wait_for_selector("text=Queue a sweep: one trial per grid cell.")
    assert page.locator("h2", has_text="Create Run").count() == 1
    assert not problems


def test_try_it_out_on_docs_queues_a_run(page, served, problems):
    """A write from the service's own page passes the same-origin check: Swagger UI's "Try it out"
    posts the documented example spec (with the browser's Origin) and gets 202."""
    url, _ = served
    before = httpx.get(f"{url}/runs").json()["total"]
    page.goto(f"{url}/docs")
    op = page.locator("#operations-runs-create_run_runs_post")
    op.locator(".opblock-summary").click()
    op.get_by_role("button", name="Try it out").click()
    # Swagger UI sends the documented default of the query parameters too (?dry_run=false)
    with page.expect_request(lambda r: r.method == "POST" and r.url.split("?")[0] == f"{url}/runs") as sent:
        op.get_by_role("button", name="Execute").click()
    assert sent.value.all_headers().get("origin") == url  # checked, and it is the service's own
    status = op.locator(".live-responses-table tbody .response-col_status").first
    status.wait_for()
    assert status.inner_text().strip() == "202"
    assert httpx.get(f"{url}/runs").json()["total"] == before + 1
    assert not problems

"""The dashboard in a real browser: Playwright (sync API) driving Debian's Chromium.

Reusable pieces: ``serve(app)`` runs any ASGI app under uvicorn on a free loopback port;
the ``browser`` fixture launches /usr/bin/chromium (never ``playwright install``); the ``page``
fixture fails the test on JavaScript dialogs, page errors, console errors and requests that
leave loopback (collected in the ``problems`` fixture).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
import uvicorn
from test_dashboard_pages import BIT_CONFIGS, ESTIMATORS, SCRIPT_NAME, make_app, sample_source

from dashboard import pages

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def require_chromium() -> None:
    """Skip without Chromium, except in CI (CI=true) where that is a failure."""
    if CHROMIUM.exists():
        return
    message = f"{CHROMIUM} is missing (apt-get install -y chromium, or run scripts/system-deps.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def serve(app, timeout: float = 10.0):
    """Run ``app`` under uvicorn in a thread on a free 127.0.0.1 port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def problems() -> list[str]:
    """Dialogs, page errors and non-loopback requests seen by ``page``."""
    return []


@pytest.fixture
def page(browser, problems):
    """A fresh page in its own context; any problem fails the test at teardown too."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def guard(route):
        url = route.request.url
        if urlparse(url).hostname in LOOPBACK or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            problems.append(f"request left loopback: {url}")
            route.abort()

    context.route("**/*", guard)
    tab = context.new_page()
    tab.set_default_timeout(10_000)
    tab.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on("console", lambda msg: msg.type == "error" and problems.append(f"console error: {msg.text}"))
    yield tab
    context.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def dashboard():
    """The dashboard over the sample FakeSource, served for the whole module."""
    source = sample_source()
    with serve(make_app(source)) as url:
        yield SimpleNamespace(url=url, source=source)


def plot_traces(page, element_id: str) -> list[dict]:
    """The traces plotly.js drew in ``element_id`` (read from the DOM, after it has drawn)."""
    page.wait_for_function(f"() => {{ const g = document.getElementById('{element_id}');"
                           " return g && g.data && g.data.length > 0 && g.querySelector('.main-svg'); }")
    return page.evaluate(f"""() => document.getElementById('{element_id}').data.map(t => ({{
        name: t.name, kind: t.meta && t.meta.kind, x: Array.from(t.x || []), y: Array.from(t.y || [])}}))""")


def screenshot(page, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)
    assert path.exists() and path.stat().st_size > 20_000
    return path


def test_run_figure_has_one_trace_per_estimator(page, dashboard, problems, tmp_path):
    page.goto(f"{dashboard.url}/dashboard/runs/1")
    traces = plot_traces(page, "acc-vs-bits")
    estimators = [t for t in traces if t["kind"] == "estimator"]
    assert sorted(t["name"] for t in estimators) == sorted(ESTIMATORS)
    assert all(t["x"] == [f"W{w}A{a}" for w, a in BIT_CONFIGS] for t in estimators)
    assert [t["x"] for t in traces if t["kind"] == "float"] == [["float"]]
    assert {t["kind"] for t in traces} == {"estimator", "float", "paper"}
    for i in range(len(ESTIMATORS)):
        plot_traces(page, f"heatmap-{i}")
    screenshot(page, tmp_path / "run.png")
    assert not problems


def test_leaderboard_rows_follow_source(page, dashboard, problems, tmp_path):
    page.goto(f"{dashboard.url}/dashboard/leaderboard?dataset=cifar10&model=convnet_a")
    shown = page.eval_on_selector_all(
        "#leaderboard tr[data-rank]", "rows => rows.map(r => [r.dataset.estimator, Number(r.dataset.rank)])")
    expected = [[r["estimator_label"], r["rank"]] for r in dashboard.source.leaderboard("cifar10", "convnet_a")]
    assert shown == expected
    assert page.locator("#leaderboard tr.best").count() == len(BIT_CONFIGS) + 1
    screenshot(page, tmp_path / "leaderboard.png")
    page.select_option("#dataset-select", "cifar100")  # auto-submits; the model falls back to cifar100's
    page.wait_for_url("**dataset=cifar100**")
    assert page.input_value("#model-select") == "convnet_d"
    assert not problems


def test_script_named_run_shows_as_text(page, dashboard, problems, tmp_path):
    page.goto(f"{dashboard.url}/dashboard/")
    link = page.get_by_role("link", name=SCRIPT_NAME)
    assert link.count() == 1 and link.inner_text() == SCRIPT_NAME
    link.click()
    page.wait_for_url("**/dashboard/runs/2")
    assert page.locator("#run-name").inner_text() == SCRIPT_NAME
    assert SCRIPT_NAME in page.title()
    assert '<img src=x onerror="alert(2)">' in page.locator("#trials").inner_text()
    screenshot(page, tmp_path / "hostile.png")
    assert not problems


def test_live_run_page_updates_in_place(page, problems, monkeypatch):
    monkeypatch.setattr(pages, "REFRESH_SECONDS", 1)
    source = sample_source()
    with serve(make_app(source)) as url:
        page.goto(f"{url}/dashboard/runs/2")
        assert page.locator("main[data-live]").count() == 1
        page.evaluate("() => { window.__marker = 1; }")  # survives only if the page is not reloaded
        for trial in source.trials.values():
            if trial["run_id"] == 2 and trial["status"] != "done":
                trial.update(status="done", final_test_acc=0.75, best_val_acc=0.75)
        source.runs[2].update(status="done", progress={"done": 3, "running": 0, "queued": 0, "failed": 0,
                                                       "cancelled": 0})
        page.wait_for_selector("main:not([data-live])")
        assert page.evaluate("() => window.__marker") == 1
        assert page.locator("#run-name").inner_text() == SCRIPT_NAME
        assert page.locator("#trials .status-done").count() == 3
    assert not problems

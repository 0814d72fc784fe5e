"""The real app in Debian's Chromium over a database at scale: 200 runs, one of 2,000 trials with
20 epochs of metrics each (tests/scale_db.py). Each page is loaded and its navigation timing
printed (``pytest -s`` shows it; bench/pages.py measures the same in BENCHMARKS.md); the asserts
are functional only: the page renders, the pager counts right, the figures draw every trial."""
from __future__ import annotations

import pytest
from scale_db import BIG_ESTIMATORS, fill
from test_browser import browser, page, plot_traces, problems, serve  # noqa: F401  (fixtures)

from dashboard import pages
from service.app import create_app
from service.config import Settings
from service.db import make_engine

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RUNS, SEEDS, EPOCHS = 200, 10, 20  # 2,000 trials in the big run

TIMING = """() => { const n = performance.getEntriesByType('navigation')[0];
  return {server_ms: n.responseStart - n.requestStart, html_kib: n.transferSize / 1024,
          dom_ready_ms: n.domContentLoadedEventEnd, load_ms: n.loadEventEnd}; }"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'scale.sqlite'}"
    engine = make_engine(url)
    ids = fill(engine, runs_total=RUNS, seeds=SEEDS, epochs=EPOCHS)
    engine.dispose()
    with serve(create_app(Settings(database_url=url, api_token=None))) as base:
        yield base, ids


def timed(page, url: str, what: str) -> dict:
    page.goto(url)
    timing = page.evaluate(TIMING)
    print(f"\n{what}: " + ", ".join(f"{k} {v:.1f}" for k, v in timing.items()))
    return timing


def test_run_page_of_2000_trials(page, served, problems):
    base, ids = served
    assert ids["trials"] == RUNS - 1 + 2000 + 4 * (RUNS - 1) and ids["metrics"] == ids["trials"] * EPOCHS
    timed(page, f"{base}/dashboard/runs/{ids['big_run']}", "run page (2,000 trials)")
    traces = [t for t in plot_traces(page, "acc-vs-bits") if t["kind"] == "estimator"]
    drawn = page.evaluate("() => performance.now()")
    print(f"run page figure drawn at {drawn:.0f} ms")
    assert sorted(t["name"] for t in traces) == sorted(BIG_ESTIMATORS) and all(len(t["x"]) == 20 for t in traces)
    assert page.locator("#trials tbody tr").count() == pages.TRIALS_PER_PAGE
    assert page.locator("#trials-shown").inner_text() == "1–100 of 2000"
    page.get_by_role("link", name="next →").click()
    page.wait_for_url("**offset=100**")
    assert page.locator("#trials-shown").inner_text() == "101–200 of 2000"
    assert page.locator("#trials tbody tr").count() == pages.TRIALS_PER_PAGE
    page.locator("#trials tbody tr a").first.click()  # a trial of the big run: its 20 epochs only
    page.wait_for_url("**/dashboard/trials/**")
    assert page.locator("#metrics tbody tr").count() == EPOCHS
    plot_traces(page, "training-curves")
    assert not problems


def test_runs_page_of_200_runs_and_compare(page, served, problems):
    base, ids = served
    timed(page, f"{base}/dashboard/", "runs page (200 runs)")
    assert page.locator("#runs tbody tr").count() == pages.RUNS_PER_PAGE
    assert page.locator("#runs-shown").inner_text() == "1–50 of 200"
    page.check(f"input[name=run][value='{ids['big_run']}']")
    page.check(f"input[name=run][value='{ids['small_runs'][-1]}']")
    page.click("#compare-button")
    page.wait_for_url("**/dashboard/compare?run=**")
    for i in range(2):
        assert plot_traces(page, f"acc-vs-bits-{i}")
    assert page.locator("#differences tr[data-field]").count() >= 1  # the grids' recipes differ (epochs, lr)
    timed(page, page.url, "compare page (2,000 + 5 trials)")
    assert not problems


def test_leaderboard_page_at_scale(page, served, problems):
    base, _ = served
    timed(page, f"{base}/dashboard/leaderboard", "leaderboard page (3,000 trials)")
    assert page.locator("#leaderboard tr[data-rank]").count() >= len(BIG_ESTIMATORS) * 20
    # the big grid's 20 cells; the float references were trained by the small runs, under other protocols
    assert page.locator("#leaderboard tr.best").count() == 20
    assert not problems

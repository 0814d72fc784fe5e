"""Dashboard pages at scale: 200 runs, one of 2,000 trials with 20 epochs of metrics each.

    python bench/pages.py [--runs 200] [--seeds 10] [--epochs 20] [--repeat 7] [--no-browser]

Builds the database of tests/test_browser_scale.py (tests/scale_db.py, a SQLite file) behind the
real app, then times each page's server render (GET through the app in-process, median of
``--repeat``, interleaved) and, with Chromium (/usr/bin/chromium), its load in the browser
(navigation timing: DOM ready and load event, median of 3 fresh contexts). "before" is the run page
as it was before pagination: every trial in the table (``TRIALS_PER_PAGE`` set past the run's size),
measured in the same run as "after".
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fastapi.testclient import TestClient  # noqa: E402
from scale_db import fill  # noqa: E402

from dashboard import pages  # noqa: E402
from service import store  # noqa: E402
from service.app import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import make_engine, session_factory  # noqa: E402

ALL_TRIALS = 10**6
NAV = """() => { const n = performance.getEntriesByType('navigation')[0];
  return [n.responseStart - n.requestStart, n.domContentLoadedEventEnd, n.loadEventEnd, n.transferSize]; }"""


def page_paths(ids: dict, trial_id: int) -> list[tuple[str, str, int]]:
    """(label, path, trials per page) of each measured page; the first two are before/after."""
    big, small = ids["big_run"], ids["small_runs"][-1]
    after = pages.TRIALS_PER_PAGE
    n = len(ids["small_runs"]) + 1
    return [(f"run page, all {ids['big_trials']:,} trials listed (before)", f"/dashboard/runs/{big}", ALL_TRIALS),
            ("run page, 100 trials a page (after)", f"/dashboard/runs/{big}", after),
            (f"trial page ({ids['epochs']} epochs)", f"/dashboard/trials/{trial_id}", after),
            (f"runs page (50 of {n} runs)", "/dashboard/", after),
            ("leaderboard page", "/dashboard/leaderboard", after),
            ("compare page (big run + a small one)", f"/dashboard/compare?run={big}&run={small}", after)]


def with_page_size(size: int):
    pages.TRIALS_PER_PAGE = size


def server_times(client: TestClient, paths, repeat: int) -> dict[str, dict]:
    out = {label: [] for label, _, _ in paths}
    sizes = {}
    for _ in range(repeat + 1):  # the first round warms caches; interleaved rounds after it
        for label, path, size in paths:
            with_page_size(size)
            t0 = time.perf_counter()
            r = client.get(path)
            out[label].append((time.perf_counter() - t0) * 1000)
            sizes[label] = len(r.content)
            assert r.status_code == 200, (path, r.status_code)
    with_page_size(100)
    return {label: {"ms": statistics.median(ts[1:]), "kib": sizes[label] / 1024} for label, ts in out.items()}


def browser_times(url: str, paths, rounds: int = 3) -> dict[str, dict] | None:
    if not Path("/usr/bin/chromium").exists():
        return None
    from playwright.sync_api import sync_playwright
    from test_browser import CHROMIUM_ARGS, serve

    out: dict[str, list] = {label: [] for label, _, _ in paths}
    with serve(create_app(Settings(database_url=url, api_token=None))) as base, sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        for _ in range(rounds):
            for label, path, size in paths:
                with_page_size(size)
                context = chromium.new_context(viewport={"width": 1280, "height": 900})
                tab = context.new_page()
                tab.goto(base + pages.Urls().static("plotly.min.js"))  # plotly.js cached: measure the page
                tab.goto(base + path)
                out[label].append(tab.evaluate(NAV))
                context.close()
        chromium.close()
    with_page_size(100)
    return {label: {"server_ms": statistics.median(v[0] for v in vs),
                    "dom_ready_ms": statistics.median(v[1] for v in vs),
                    "load_ms": statistics.median(v[2] for v in vs)} for label, vs in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=10, help="200 trials per seed in the big run")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    url = f"sqlite:///{tempfile.mkdtemp(prefix='bitbench-pages-')}/scale.sqlite"
    engine = make_engine(url)
    t0 = time.perf_counter()
    ids = fill(engine, runs_total=args.runs, seeds=args.seeds, epochs=args.epochs)
    ids.update(big_trials=200 * args.seeds, epochs=args.epochs)
    engine.dispose()
    print(f"{platform.machine()}, Python {platform.python_version()}, SQLite; {args.runs} runs, "
          f"{ids['trials']} trials ({200 * args.seeds} in one run), {ids['metrics']} metric rows "
          f"(built in {time.perf_counter() - t0:.1f} s)\n")
    with session_factory(make_engine(url))() as s:
        paths = page_paths(ids, store.list_trials(s, ids["big_run"], limit=1)[0]["id"])
    with TestClient(create_app(Settings(database_url=url, api_token=None))) as client:
        server = server_times(client, paths, args.repeat)
    browser = None if args.no_browser else browser_times(url, paths)
    base = server[paths[1][0]]["ms"]
    head = "| page | server render, ms (median) | × after | HTML KiB |"
    rows = [f"| {label} | {s['ms']:.0f} | {s['ms'] / base:.2f} | {s['kib']:.0f} |" for label, s in server.items()]
    print("\n".join([head, "|---|---:|---:|---:|", *rows]))
    if browser:
        base = browser[paths[1][0]]["load_ms"]
        print("\n| page in Chromium | response, ms | DOM ready, ms | load, ms | load × after |")
        print("|---|---:|---:|---:|---:|")
        for label, b in browser.items():
            print(f"| {label} | {b['server_ms']:.0f} | {b['dom_ready_ms']:.0f} | {b['load_ms']:.0f} | "
                  f"{b['load_ms'] / base:.2f} |")


if __name__ == "__main__":
    main()

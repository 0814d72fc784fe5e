"""The dashboard over a real database at scale: the run page shows one page of trials with a pager
while its figures still cover every trial, and each page costs the same few SQL statements
whatever the number of trials (no N+1), on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import re
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from scale_db import BIG_ESTIMATORS, fill
from sqlalchemy import event

from dashboard import pages
from service.app import create_app
from service.config import Settings


@pytest.fixture
def scaled(engine, db_url):
    """3 runs: two of 5 trials, one of 200 (3 metric rows per trial), behind the real app."""
    ids = fill(engine, runs_total=3, seeds=1, epochs=3)
    with TestClient(create_app(Settings(database_url=db_url, api_token=None))) as client:
        yield client, ids


@contextmanager
def statements(client):
    """The SQL statements the app's engine runs inside the block."""
    seen: list[str] = []
    engine = client.app.state.engine

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def _trial_rows(body: str) -> int:
    return len(re.findall(r"<tr data-trial-id=", body))


def test_run_page_shows_one_page_of_trials_and_figures_of_all(scaled):
    client, ids = scaled
    big = ids["big_run"]
    first = client.get(f"/dashboard/runs/{big}")
    assert first.status_code == 200
    assert _trial_rows(first.text) == pages.TRIALS_PER_PAGE == 100
    assert 'id="trials-shown">1–100 of 200<' in first.text
    assert f'href="/dashboard/runs/{big}?offset=100#trials">next →' in first.text
    assert "← previous" not in first.text
    # the figure still draws every finished trial: all 10 estimators at all 20 bit cells
    spec = re.search(r'<script type="application/json" id="acc-vs-bits-spec">(.*?)</script>', first.text, re.S)
    traces = [t for t in json.loads(spec.group(1).replace("<\\/", "</"))["data"]
              if t["meta"]["kind"] == "estimator"]
    assert sorted(t["meta"]["estimator"] for t in traces) == sorted(BIG_ESTIMATORS)
    assert all(len(t["x"]) == 20 for t in traces)

    second = client.get(f"/dashboard/runs/{big}?offset=100&metric=selected")
    assert _trial_rows(second.text) == 100 and 'id="trials-shown">101–200 of 200<' in second.text
    assert f'href="/dashboard/runs/{big}?metric=selected#trials">← previous' in second.text
    assert "next →" not in second.text
    first_ids = set(re.findall(r'<tr data-trial-id="(\d+)"', first.text))
    assert first_ids.isdisjoint(re.findall(r'<tr data-trial-id="(\d+)"', second.text))

    small = client.get(f"/dashboard/runs/{ids['small_runs'][0]}").text
    assert _trial_rows(small) == 5 and 'id="trials-pager"' not in small  # fits on one page
    past = client.get(f"/dashboard/runs/{big}?offset=5000")
    assert past.status_code == 200 and _trial_rows(past.text) == 0


def test_pages_cost_the_same_statements_whatever_the_trial_count(scaled):
    client, ids = scaled
    big, small = ids["big_run"], ids["small_runs"][0]
    trial_of = {}
    for run_id in (big, small):
        body = client.get(f"/dashboard/runs/{run_id}").text
        trial_of[run_id] = re.search(r'<tr data-trial-id="(\d+)"', body).group(1)

    def count(path: str) -> list[str]:
        with statements(client) as seen:
            assert client.get(path).status_code == 200, path
        return seen

    for template in ("/dashboard/runs/{run}", "/dashboard/runs/{run}?offset=100", "/dashboard/trials/{trial}",
                     "/dashboard/compare?run={run}&run={other}"):
        at_scale = count(template.format(run=big, trial=trial_of[big], other=small))
        small_one = count(template.format(run=small, trial=trial_of[small], other=big))
        assert len(at_scale) == len(small_one) <= 12, (template, at_scale)
    for path in ("/dashboard/", "/dashboard/leaderboard", f"/dashboard/runs/{big}"):
        seen = count(path)
        assert len(seen) <= 6, (path, seen)
        assert not any(re.search(r"\bFROM metrics\b", s) for s in seen), (path, seen)  # no metric rows read
    trial_sql = [s for s in count(f"/dashboard/trials/{trial_of[big]}") if re.search(r"\bFROM metrics\b", s)]
    assert len(trial_sql) == 1 and "metrics.trial_id =" in trial_sql[0]  # one trial's metrics, not the run's

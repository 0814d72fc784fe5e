"""GET /runs/{id}/report over a real database: a finished run's archive is rendered once, stored and
served byte for byte; running runs are rendered each time; renders hold no database session, are
bounded per process (503 + Retry-After beyond) and shared by concurrent requests."""
from __future__ import annotations

import io
import shutil
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service import report, store
from service.app import create_app
from service.config import Settings
from service.sink import SqlSink
from service.tables import report_archives, trials
from workers.spec import parse_spec

pytestmark = pytest.mark.timeout(300)
SPEC = {"name": "served report", "estimators": ["aqe", "ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0, 1],
        "epochs": 2, "include_full_precision": False}


@pytest.fixture
def make_client(db_url):
    """``make_client(**settings)`` → a TestClient over its own app on the test database."""
    with ExitStack() as stack:
        def make(**overrides) -> TestClient:
            return stack.enter_context(TestClient(create_app(Settings(database_url=db_url, **overrides))))

        yield make


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def add_run(client: TestClient, status: str = "done") -> int:
    """A run of SPEC with every trial trained through the SQL sink; ``status`` done or running."""
    sessions = client.app.state.session_factory
    spec = parse_spec(SPEC)
    with sessions() as s:
        run_id = store.create_run(s, spec)[0]["id"]
        assert store.claim_run(s, "test")["id"] == run_id
    sink = SqlSink(sessions, run_id)
    for n, trial in enumerate(spec.trials()):
        acc = 0.6 + 0.1 * n
        sink.on_trial_start(trial.key, {"device": "cpu", "attempt": 1})
        for epoch in (1, 2):
            sink.on_epoch(trial.key, {"epoch": epoch, "test_acc": acc - 0.1 / epoch, "val_acc": acc})
        sink.on_trial_end(trial.key, "done", {"final_test_acc": acc, "final_val_acc": acc, "best_val_acc": acc}, None)
    if status != "running":
        with sessions() as s:
            assert store.finish_run(s, run_id, status)
    return run_id


def get_report(client: TestClient, run_id: int, png: bool = False):
    return client.get(f"/runs/{run_id}/report", params={"png": png})


def results_md(body: bytes, run_id: int) -> str:
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        return z.read(f"bitbench-run-{run_id}/RESULTS.md").decode()


def stored(client: TestClient) -> list[tuple]:
    with client.app.state.session_factory() as s:
        return [tuple(r) for r in s.execute(select(report_archives.c.run_id, report_archives.c.png,
                                                   func.length(report_archives.c.body)))]


def test_a_finished_runs_report_is_rendered_once_and_served_from_the_database(make_client):
    client = make_client()
    run_id = add_run(client, "done")
    first = get_report(client, run_id)
    assert first.status_code == 200 and first.headers["content-type"] == "application/zip"
    assert "| 1 | `ste` **(best)** |" in results_md(first.content, run_id)  # ste's seeds: 80, 90 % vs aqe's 60, 70 %
    second = get_report(client, run_id)
    service = report.reports(client.app)
    assert service.renders == 1 and second.content == first.content
    assert stored(client) == [(run_id, False, len(first.content))]
    # another API process (a replica, or after a restart) serves the stored archive too
    other = make_client()
    assert get_report(other, run_id).content == first.content and report.reports(other.app).renders == 0
    # with PNGs is another archive; without Chromium it is served but not kept (the PNGs failed)
    with_png = get_report(client, run_id, png=True)
    assert with_png.status_code == 200 and service.renders == 2
    assert len(stored(client)) == (2 if shutil.which("chromium") else 1)


def test_a_changed_run_is_rendered_again(client):
    run_id = add_run(client, "failed")
    first = get_report(client, run_id)
    with client.app.state.session_factory() as s:  # an edited row: the stored archive no longer fits
        s.execute(update(trials).where(trials.c.run_id == run_id, trials.c.key == "ste-w1a1-s1")
                  .values(final_test_acc=0.2))
        s.commit()
    second = get_report(client, run_id)
    assert report.reports(client.app).renders == 2 and second.content != first.content
    assert "| 1 | `aqe` **(best)** |" in results_md(second.content, run_id)
    assert [row[:2] for row in stored(client)] == [(run_id, False)]  # replaced, not added
    assert get_report(client, run_id).content == second.content and report.reports(client.app).renders == 2


def test_a_running_runs_report_is_rendered_every_time_and_not_stored(client):
    run_id = add_run(client, "running")
    for _ in range(2):
        r = get_report(client, run_id)
        assert r.status_code == 200 and "status **running**" in results_md(r.content, run_id)
    assert report.reports(client.app).renders == 2 and stored(client) == []
    assert get_report(client, 999).status_code == 404


def test_beyond_the_render_bound_a_request_gets_503_with_retry_after(make_client):
    client = make_client(report_renders=1)
    done, running = add_run(client, "done"), add_run(client, "running")
    archive = get_report(client, done).content
    service = report.reports(client.app)
    assert service.slots.acquire(blocking=False)  # the one render slot is taken
    try:
        busy = get_report(client, running)
        assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
        [err] = busy.json()["detail"]
        assert err["type"] == "renders_busy" and err["loc"] == [] and "BITBENCH_REPORT_RENDERS" in err["msg"]
        assert get_report(client, done).content == archive  # a stored archive needs no slot
    finally:
        service.slots.release()
    assert get_report(client, running).status_code == 200 and service.renders == 2


class GatedRender:
    """A render that waits for ``go`` (in a thread pool): what the API does meanwhile can be seen."""

    def __init__(self):
        self.go, self.started, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, records: dict, png: bool) -> tuple[bytes, bool]:
        self.calls += 1
        self.started.set()
        assert self.go.wait(60)
        return report.render_archive(records, False)[0], not png


def test_renders_hold_no_session_and_concurrent_requests_share_one(client):
    run_id = add_run(client, "done")
    gate = GatedRender()
    client.app.state.reports = report.ReportService(client.app.state.session_factory, 1, render=gate,
                                                    executor=ThreadPoolExecutor(1))
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(get_report, client, run_id) for _ in range(3)]
        assert gate.started.wait(60)
        time.sleep(0.3)  # the other two requests reach the render in flight
        engine = client.app.state.engine
        assert engine.pool.checkedout() == 0  # no session is open while it renders
        assert client.get("/runs").json()["total"] == 1  # other requests are answered
        gate.go.set()
        bodies = [a.result(60).content for a in answers]
    assert gate.calls == 1 and bodies[0] == bodies[1] == bodies[2]
    assert stored(client) == [(run_id, False, len(bodies[0]))]


def test_an_incomplete_png_archive_is_served_but_not_stored(client):
    run_id = add_run(client, "done")
    gate = GatedRender()
    gate.go.set()
    client.app.state.reports = report.ReportService(client.app.state.session_factory, 1, render=gate,
                                                    executor=ThreadPoolExecutor(1))
    assert get_report(client, run_id, png=True).status_code == 200
    assert get_report(client, run_id, png=True).status_code == 200
    assert gate.calls == 2 and stored(client) == []


@pytest.mark.slow
def test_get_runs_is_answered_while_reports_render(client):
    """The audit's stall: four clients asking for a PNG report used to hold all four database
    sessions while Chromium rendered, and GET /runs waited for them."""
    if not shutil.which("chromium"):
        pytest.skip("Debian's chromium is needed by kaleido")
    run_id = add_run(client, "done")
    finished: dict[str, float] = {}

    def fetch(name: str, path: str, **params) -> int:
        code = client.get(path, params=params).status_code
        finished[name] = time.monotonic()
        return code

    with ThreadPoolExecutor(5) as pool:
        reports = [pool.submit(fetch, f"report-{i}", f"/runs/{run_id}/report", png=True) for i in range(4)]
        time.sleep(1.0)  # the four report requests are in
        runs = pool.submit(fetch, "runs", "/runs")
        assert runs.result(120) == 200 and [r.result(300) for r in reports] == [200] * 4
    assert finished["runs"] < min(t for name, t in finished.items() if name.startswith("report"))

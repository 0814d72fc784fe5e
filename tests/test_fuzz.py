"""Schemathesis over every operation of the live app: no 5xx, and every answer matches the schema.

The app runs in-process (ASGI) on a temporary SQLite database that holds three runs (one with
finished trials and epochs), with a token configured and sent with every case. Schemathesis
sends the schema's example, cases that fit the OpenAPI schema and cases that do not (its
examples, coverage and fuzzing phases) and checks each answer: not a 5xx, a documented status,
content type, headers and body, writes refused without the token, schema-violating input
refused. Deterministic (the same cases every run) and bounded: ``MAX_EXAMPLES`` an operation in
the fuzzing phase, at least ``MIN_CASES`` in all (``test_enough_cases_ran``).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service import store
from service.app import create_app
from service.config import Settings
from service.sink import SqlSink
from service.tables import MAX_ID

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKEN = "fuzz-token"
MAX_EXAMPLES = 120
MIN_CASES = 1000
SEEDED = (1, 2, 3)
CASES: dict[str, int] = {}  # operation → cases sent


def _app():
    """The app on a fresh SQLite file (removed when the process exits): the schema is loaded, and the
    cases generated, at collection time."""
    tmp = tempfile.mkdtemp(prefix="bitbench-fuzz-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    # a small grid limit keeps each accepted POST /runs to a few rows
    return create_app(Settings(database_url=f"sqlite:///{tmp}/fuzz.sqlite", api_token=TOKEN, max_trials=20))


def _seed(app) -> None:
    """Runs 1-3, so the ids tried first name something: queued; with finished trials and epochs (the
    leaderboard, export and report have rows); cancelled."""
    sessions = app.state.session_factory
    spec = {"estimators": ["aqe", "ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0], "epochs": 2}
    with sessions() as s:
        ids = [store.create_run(s, {**spec, "name": name})[0]["id"] for name in ("queued", "finished", "cancelled")]
        store.request_cancel(s, ids[2])
    assert tuple(ids) == SEEDED
    sink = SqlSink(sessions, ids[1])
    for key, acc in (("aqe-w1a1-s0", 0.8), ("ste-w1a1-s0", 0.7)):
        sink.on_trial_start(key, {"device": "cpu"})
        for epoch in (1, 2):
            sink.on_epoch(key, {"epoch": epoch, "train_loss": 1.0, "train_acc": acc, "val_acc": acc, "test_acc": acc,
                                "lr": 0.01, "epoch_seconds": 0.1, "images_per_s": 1e3, "device": "cpu",
                                "schedule": {"aqe.alpha": 0.5}})
        sink.on_trial_end(key, "done", {"final_test_acc": acc, "final_val_acc": acc, "best_val_acc": acc,
                                        "best_epoch": 2, "epochs": 2}, None)
    sink.on_trial_end("float-w32a32-s0", "failed", None, "RuntimeError: boom")


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())  # runs the lifespan: migrated
_seed(schema.app)
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")


def _names_a_run(run_id) -> bool:
    """Whether ``run_id``, as it will appear in the URL, names a stored run."""
    try:
        run_id = int(str(run_id))
    except ValueError:
        return False
    if not 1 <= run_id <= MAX_ID:
        return False
    with schema.app.state.session_factory() as s:
        return store.get_run(s, run_id) is not None


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case):
    key = f"{case.method} {case.path}"
    if key == "GET /runs/{run_id}/report":
        # The report renders on the request path (with PNGs by kaleido: ~17 s a call here; issue 12
        # item 2): until it no longer does, it is fuzzed with ids that name no run.
        assume(not _names_a_run(case.path_parameters["run_id"]))
    CASES[key] = CASES.get(key, 0) + 1
    excluded = []
    if key == "POST /runs":
        # The spec is checked past its JSON schema: a spec that fits it may still be refused (422) for
        # the grid's size, duplicate cells or a W32A32 cell. A spec that does not fit it is always
        # refused (the spec's models are strict: no "3" or 3.0 for an integer).
        excluded = [positive_data_acceptance]
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=excluded)


def test_enough_cases_ran():
    """Every operation was fuzzed, and at least ``MIN_CASES`` cases were sent (after ``test_api``)."""
    if not CASES:
        pytest.skip("test_api did not run in this session")
    documented = {f"{m.upper()} {p}" for p, ops in schema.raw_schema["paths"].items() for m in ops}
    assert documented <= set(CASES), CASES
    assert sum(CASES.values()) >= MIN_CASES, CASES

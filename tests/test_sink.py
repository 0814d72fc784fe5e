"""service.sink.SqlSink: a pickled sink carries no database password, and every event is logged with
the run and trial ids (and no password)."""
from __future__ import annotations

import logging
import pickle

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from service import store
from service.config import get_settings
from service.db import make_engine, migrate, session_factory
from service.sink import SqlSink
from service.tables import metrics, trials
from workers.spec import parse_spec

PASSWORD = "pw-s3cret-7fQ"
KEY = "ste-w1a1-s0"


def epoch(n: int) -> dict:
    return {"epoch": n, "train_loss": 0.5, "train_acc": 0.5, "val_acc": 0.5, "test_acc": 0.5, "lr": 0.01,
            "device": "cpu", "schedule": {}}


def new_run(url) -> int:
    engine = make_engine(url)
    migrate(engine)
    with session_factory(engine)() as s:
        run_id = store.create_run(s, parse_spec({"name": "sink", "estimators": ["ste"],
                                                "include_full_precision": False}))[0]["id"]
    engine.dispose()
    return run_id


def stored(url, run_id) -> tuple[str, list[int]]:
    engine = make_engine(url)
    with engine.connect() as c:
        status = c.execute(select(trials.c.status).where(trials.c.run_id == run_id)).scalar_one()
        epochs = c.execute(select(metrics.c.epoch).join(trials, trials.c.id == metrics.c.trial_id)
                           .where(trials.c.run_id == run_id).order_by(metrics.c.epoch)).scalars().all()
    engine.dispose()
    return status, epochs


@pytest.fixture
def environment(monkeypatch):
    """Set or clear DATABASE_URL for ``get_settings`` (its cache cleared before and after)."""
    def set_url(url: str | None) -> None:
        if url is None:
            monkeypatch.delenv("DATABASE_URL", raising=False)
        else:
            monkeypatch.setenv("DATABASE_URL", url)
        get_settings.cache_clear()

    yield set_url
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()


def test_a_pickled_sink_without_a_password_needs_no_environment(db_url, environment, caplog):
    environment(None)
    run_id = new_run(db_url)
    sink = SqlSink.from_url(db_url, run_id)
    sink.on_trial_start(KEY, {"device": "cpu", "attempt": 1})
    clone = pickle.loads(pickle.dumps(sink))
    with caplog.at_level(logging.DEBUG, logger="service.sink"):
        clone.on_epoch(KEY, epoch(1))
        clone.on_epoch(KEY, epoch(1))
    clone.on_trial_end(KEY, "done", {"final_test_acc": 0.5}, None)
    assert stored(db_url, run_id) == ("done", [1])
    assert [m.rsplit(") ", 1)[1] for m in caplog.messages] == ["epoch 1 stored", "epoch 1 was stored already"]


@pytest.mark.postgres
def test_a_pickled_sink_holds_no_password_and_takes_it_from_database_url(postgres_databases, environment, caplog):
    """PostgreSQL (trust authentication: the password is carried, not checked) with a password in the URL."""
    plain = postgres_databases.new()
    other = postgres_databases.new()
    url = make_url(plain).set(password=PASSWORD).render_as_string(hide_password=False)
    try:
        run_id = new_run(url)
        with caplog.at_level(logging.DEBUG, logger="service.sink"):
            sink = SqlSink.from_url(url, run_id)
            sink.on_trial_start(KEY, {"device": "cpu", "attempt": 1})
            sink.on_provenance(KEY, {"device": "cpu", "host": "node-1", "ray_node_ip": "10.0.0.1", "ray_gpu_ids": []})
            sink.on_epoch(KEY, epoch(1))
            sink.on_epoch(KEY, epoch(1))
            blob = pickle.dumps(sink)
            assert PASSWORD.encode() not in blob and PASSWORD not in repr(sink)

            clone = pickle.loads(blob)
            environment(None)
            with pytest.raises(RuntimeError, match="needs DATABASE_URL") as no_env:
                clone.on_epoch(KEY, epoch(2))
            environment(make_url(other).set(password=PASSWORD).render_as_string(hide_password=False))
            with pytest.raises(RuntimeError, match="needs DATABASE_URL") as another_database:
                clone.on_epoch(KEY, epoch(2))
            assert PASSWORD not in str(no_env.value) + str(another_database.value)
            environment(url)  # the service's setting, as the dispatcher's and the workers' environment has it
            clone.on_epoch(KEY, epoch(2))
            clone.on_trial_end(KEY, "failed", None, "Traceback …\nRuntimeError: boom")
        assert stored(url, run_id) == ("failed", [1, 2])
    finally:
        postgres_databases.drop(plain)
        postgres_databases.drop(other)

    assert PASSWORD not in caplog.text
    lines = [r.getMessage() for r in caplog.records]
    tid = f"run {run_id}: trial {KEY} (id "
    assert any(m.startswith(tid) and "starts, attempt 1" in m for m in lines)
    assert any(m.startswith(tid) and "trains on cpu of host node-1" in m for m in lines)
    assert sum(m.startswith(tid) and m.endswith("epoch 1 stored") for m in lines) == 1
    assert sum(m.startswith(tid) and m.endswith("epoch 1 was stored already") for m in lines) == 1
    assert any(m.startswith(tid) and m.endswith("epoch 2 stored") for m in lines)
    assert any(m.startswith(tid) and "failed:" in m and "boom" in m for m in lines)

"""workers.records: the one vocabulary of records, what uses it agrees with it, and it needs no torch."""
from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import inspect

from service.api import schemas
from service.tables import metadata, metrics
from workers import records
from workers.records import ACTIVE, FINISHED, STATUSES, Status, trial_key
from workers.spec import parse_spec


@pytest.mark.parametrize("module", ["workers.records", "service.cli"])
def test_the_vocabulary_imports_no_torch(module):
    code = f"import {module}, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_statuses_are_the_strings_stored_and_served():
    assert STATUSES == ("queued", "running", "done", "failed", "cancelled")
    assert set(ACTIVE) | set(FINISHED) == set(STATUSES) and not set(ACTIVE) & set(FINISHED)
    assert Status.DONE == "done" and f"{Status.CANCELLED}" == "cancelled" and Status("failed") is Status.FAILED
    assert all(type(s) is str for s in (*STATUSES, *ACTIVE, *FINISHED))  # plain strings in messages and SQL
    checks = {c.sqltext.text for t in metadata.tables.values() for c in t.constraints if hasattr(c, "sqltext")}
    assert checks == {"status IN ('queued', 'running', 'done', 'failed', 'cancelled')"}


def test_float_bits_agree_with_the_estimators():
    import estimators

    assert records.FLOAT_BITS == estimators.FLOAT_BITS


def test_metric_keys_are_the_metrics_table():
    columns = [c.name for c in metrics.columns if c.name not in ("id", "trial_id")]
    assert list(records.METRIC_KEYS) == columns


def test_trial_keys_and_labels_are_built_once():
    spec = parse_spec({"name": "k", "estimators": ["ste", {"name": "aqe", "params": {"backward": "alg1"}}],
                       "methods": ["tnn"], "bits": {"w": [1, 2], "a": 1}, "seeds": [0, 7]})
    grid = spec.trials()
    labels = {t.label for t in grid}
    assert labels == {"float", "ste", "aqe[backward=alg1]", "tnn"}
    for t in grid:  # the key starts with the label (what the store once parsed back out of it)
        assert t.key == trial_key(t.label, t.w_bits, t.a_bits, t.seed) and t.key.rsplit("-w", 1)[0] == t.label
    tnn = next(t for t in grid if t.method == "tnn")
    assert (tnn.key, tnn.estimator, tnn.estimator_params) == ("tnn-w2a8-s0", "xnor", {"scale": "twn"})
    assert records.estimator_label("aqe", {"b": 2, "a": "x"}) == "aqe[a=x,b=2]"
    assert records.config_label((2, 1)) == "W2A1" and records.config_label((32, 32)) == "float"
    assert sorted([(32, 32), (1, 32), (2, 2), (1, 1)], key=records.config_sort_key) == [(1, 1), (2, 2), (1, 32),
                                                                                          (32, 32)]
    assert records.bit_config(2, 16) == (2, 32) and records.bit_config(None, 1) == (32, 1)
    with pytest.raises(ValueError, match="unknown metric 'best'; known: final, selected"):
        records.metric_field("best")


@pytest.mark.parametrize("model, shape", [
    (schemas.RunOut, records.Run), (schemas.TrialOut, records.Trial), (schemas.TrialDetail, records.TrialWithMetrics),
    (schemas.MetricOut, records.Metric), (schemas.LeaderboardRow, records.LeaderboardRow),
    (schemas.Progress, records.Progress)])
def test_response_models_mirror_the_records(model, shape):
    assert set(model.model_fields) == set(shape.__annotations__)


def test_response_literals_are_the_vocabulary():
    for field in (schemas.RunOut.model_fields["status"], schemas.TrialOut.model_fields["status"]):
        assert field.annotation.__args__ == STATUSES
    assert schemas.LeaderboardRow.model_fields["metric"].annotation.__args__ == tuple(records.RANK_METRIC_FIELDS)


def test_the_migrated_metrics_table_has_every_metric_key(engine):
    assert {c["name"] for c in inspect(engine).get_columns("metrics")} == {"id", "trial_id", *records.METRIC_KEYS}

"""val_acc_soft: the validation accuracy of the training forward (AQE's soft mix), measured without
changing the model, declared per estimator, stored per epoch and drawn beside the hard one."""
from __future__ import annotations

import json
import re

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

import estimators
from dashboard.report import mean_curves
from service import store
from service.app import create_app
from service.config import Settings
from service.report import build_report
from service.sink import SqlSink
from service.tables import metrics, trials
from workers.models import create_model
from workers.spec import parse_spec
from workers.train import evaluate, evaluate_training_forward, run_trial

pytestmark = pytest.mark.timeout(300)


def _outputs(est, x):
    """(training forward, hard forward) of ``est`` on ``x``, after one training call (LSQ's and
    LQ-Nets' initialisation), without gradients."""
    with torch.no_grad():
        est.train()
        est(x)
        est.eval()
        hard = est(x)
        est.train()
        return est(x), hard


@pytest.mark.parametrize("name", estimators.list_estimators())
def test_soft_forward_is_declared_where_the_training_forward_differs(name):
    torch.manual_seed(0)
    cls = estimators.get_estimator_class(name)
    for role in ("weight", "activation"):
        for bits in (1, 2):
            est = estimators.create_estimator(name, bits=bits, role=role)
            est.set_progress(1, 10)  # mid-schedule: AQE's α < 1
            soft, hard = _outputs(est, torch.randn(16, 4, 3, 3))
            assert (not torch.equal(soft, hard)) == cls.soft_forward, (name, role, bits)


def test_only_aqe_declares_a_soft_forward():
    assert [n for n in estimators.list_estimators() if estimators.get_estimator_class(n).soft_forward] == ["aqe"]


def _val_batches(n=64):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def test_the_training_forward_changes_nothing_and_leaves_eval_mode():
    torch.manual_seed(0)
    model = create_model("convnet_d", w_bits=1, a_bits=1, estimator="aqe")
    model.train()
    with torch.no_grad():  # give BatchNorm running statistics to keep
        model(torch.randn(64, 3, 32, 32))
    estimators.set_progress(model, 1, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _val_batches()
    soft = evaluate_training_forward(model, batches)
    assert not model.training and not any(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no BN statistics, no buffer, no weight moved
    assert soft is not None and 0.0 <= soft <= 1.0
    # at α = 1 the mix is the hard quantizer: the training forward is the eval forward exactly
    estimators.set_progress(model, 10, 10)
    assert evaluate_training_forward(model, batches) == evaluate(model, batches)


def test_no_soft_accuracy_without_a_soft_estimator():
    for kwargs in ({"estimator": "ste"}, {"w_bits": 32, "a_bits": 32}):
        model = create_model("convnet_d", **{"w_bits": 1, "a_bits": 1, **kwargs})
        assert evaluate_training_forward(model, _val_batches()) is None


def _curves(page: str) -> dict:
    """The trial page's training-curve figure (plotly JSON) from its placeholder's script element."""
    match = re.search(r'<script type="application/json" id="training-curves-spec">(.*?)</script>', page, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_a_digits_trial_stores_val_acc_soft_for_aqe_and_null_for_ste(session, sessions, db_url, tmp_path):
    spec = parse_spec({"name": "soft", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"],
                       "bits": {"w": 1, "a": 1}, "epochs": 2, "batch_size": 128, "include_full_precision": False})
    run = store.create_run(session, spec)[0]
    sink = SqlSink(sessions, run["id"])
    for trial in spec.trials():
        sink.on_trial_start(trial.key, {"device": "cpu", "attempt": 1})
        final = run_trial(spec, trial, on_epoch=lambda m, _s, k=trial.key: sink.on_epoch(k, m), threads=1)
        sink.on_trial_end(trial.key, "done", final, None)
    rows = session.execute(select(trials.c.key, metrics.c.epoch, metrics.c.val_acc, metrics.c.val_acc_soft)
                           .join(metrics, metrics.c.trial_id == trials.c.id)
                           .where(trials.c.run_id == run["id"]).order_by(trials.c.key, metrics.c.epoch)).all()
    by_key = {}
    for key, epoch, val, soft in rows:
        by_key.setdefault(key, []).append((epoch, val, soft))
    aqe, ste = by_key["aqe-w1a1-s0"], by_key["ste-w1a1-s0"]
    assert [e for e, _, _ in aqe] == [1, 2] and [e for e, _, _ in ste] == [1, 2]
    assert all(soft is None for _, _, soft in ste)
    assert all(isinstance(soft, float) and 0.0 <= soft <= 1.0 for _, _, soft in aqe)
    assert aqe[1][2] == pytest.approx(aqe[1][1])  # the last epoch's α = 1: soft and hard forward agree
    detail = store.get_trial(session, store.trial_ids(session, run["id"])["aqe-w1a1-s0"])
    assert [m["val_acc_soft"] for m in detail["metrics"]] == [soft for _, _, soft in aqe]

    ids = store.trial_ids(session, run["id"])
    with TestClient(create_app(Settings(database_url=db_url, api_token=None))) as client:
        pages = {key: client.get(f"/dashboard/trials/{ids[key]}") for key in ("aqe-w1a1-s0", "ste-w1a1-s0")}
    assert all(p.status_code == 200 for p in pages.values())
    soft_traces = {key: [t for t in _curves(p.text)["data"] if t["meta"]["key"] == "val_acc_soft"]
                   for key, p in pages.items()}
    assert soft_traces["ste-w1a1-s0"] == [] and "Val acc (training forward)" not in pages["ste-w1a1-s0"].text
    (trace,) = soft_traces["aqe-w1a1-s0"]
    assert trace["name"] == "val (training forward)" and trace["line"]["dash"] == "dash"
    assert trace["x"] == [1, 2] and trace["y"] == pytest.approx([soft for _, _, soft in aqe])
    assert trace["xaxis"] == "x2"  # the accuracy panel, beside the hard val_acc
    assert "Val acc (training forward)" in pages["aqe-w1a1-s0"].text

    # the report: the hard val accuracy per estimator, and AQE's training forward dashed beside it
    fig = mean_curves(store.export_rows(session, run["id"]), "val_acc", dashed="val_acc_soft")
    assert [(t.name, t.line.dash) for t in fig.data] == [("aqe", "solid"), ("ste", "solid"),
                                                          ("aqe: val (training forward)", "dash")]
    assert list(fig.data[2].y) == pytest.approx([soft for _, _, soft in aqe])
    assert fig.data[2].line.color == fig.data[0].line.color
    files = build_report(session, run["id"], tmp_path / "report", png=False)
    assert files["validation_curves.html"].exists()
    assert "[validation_curves.html](validation_curves.html)" in files["RESULTS.md"].read_text()

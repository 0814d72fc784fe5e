"""AQE's lead against capacity: the trend regression, the paper's points, and the report section over
several runs (one per model size) stored in a real database, served by the real app and asked for by the CLI."""
from __future__ import annotations

import io
import math
import re
import zipfile
from contextlib import ExitStack

import numpy as np
import pytest
from fastapi.testclient import TestClient
from scipy import stats

from dashboard import capacity
from dashboard.stats import t_quantile
from service import store
from service.app import create_app
from service.config import Settings
from service.report import build_report
from service.sink import SqlSink
from workers.spec import parse_spec

# ------------------------------------------------------------------------------------------------- the trend


def test_trend_matches_an_independent_least_squares_fit():
    x = [14.8, 14.8, 14.8, 15.3, 15.3, 15.3, 16.1, 16.1, 17.3, 17.3]
    y = [0.031, 0.018, 0.027, 0.022, 0.009, 0.015, 0.004, 0.012, -0.006, 0.003]
    fit = capacity.trend(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    ref = stats.linregress(x, y)
    assert fit["n"] == 10
    assert fit["slope"] == pytest.approx(slope, rel=1e-12) and fit["intercept"] == pytest.approx(intercept, rel=1e-12)
    assert fit["se"] == pytest.approx(ref.stderr, rel=1e-9) and fit["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    # the interval from the residuals by hand: s² = Σr²/(n − 2), se = s/√Sxx, t(0.975, 8) = 2.306
    residuals = np.asarray(y) - np.polyval([slope, intercept], x)
    se = math.sqrt(float(residuals @ residuals) / 8 / float(((np.asarray(x) - np.mean(x)) ** 2).sum()))
    assert t_quantile(0.975, 8) == pytest.approx(2.306004, abs=1e-6)
    assert (fit["ci_low"], fit["ci_high"]) == pytest.approx((slope - 2.306004 * se, slope + 2.306004 * se), rel=1e-6)
    assert fit["slope"] < 0 and fit["ci_high"] < 0 and fit["p_value"] < 0.01  # the lead shrinks with size here


def test_trend_edge_cases():
    exact = capacity.trend([1, 2, 3, 4], [3, 5, 7, 9])  # y = 1 + 2x: no residual
    assert (exact["slope"], exact["intercept"], exact["se"], exact["ci_low"], exact["ci_high"], exact["p_value"]) \
        == pytest.approx((2, 1, 0, 2, 2, 0))
    flat_x = capacity.trend([3, 3, 3], [1, 2, 3])  # one size: no slope
    assert flat_x["slope"] is None and flat_x["p_value"] is None
    two = capacity.trend([1, 2], [1, 3])  # a slope, but no residual degrees of freedom: no interval
    assert two["slope"] == 2 and two["ci_low"] is None and two["p_value"] is None


def test_trends_take_every_seed_difference_as_an_observation_and_are_holm_adjusted():
    rows = [{"candidate": "aqe", "baseline": "clipped_ste", "bits": bits, "model": m, "log2_weights": x,
             "differences": d, "diff": sum(d) / len(d)}
            for bits, per_model in {"W1A1": [(10.0, [0.03, 0.02, 0.04]), (11.0, [0.02, 0.01, 0.02]),
                                             (12.0, [0.0, 0.01, -0.01])],
                                    "W2A2": [(10.0, [0.01, -0.01, 0.0]), (11.0, [0.0, 0.01, 0.0]),
                                             (12.0, [0.01, 0.0, 0.0])]}.items()
            for m, (x, d) in zip("cba", per_model, strict=True)]
    out = capacity.trends(rows)
    assert [(t["bits"], t["models"], t["n"]) for t in out] == [("W1A1", 3, 9), ("W2A2", 3, 9)]
    x = [10.0] * 3 + [11.0] * 3 + [12.0] * 3
    for t, bits in zip(out, ("W1A1", "W2A2"), strict=True):
        y = [d for r in rows if r["bits"] == bits for d in r["differences"]]
        assert t["slope"] == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)
    p = [t["p_value"] for t in out]
    assert [t["p_adjusted"] for t in out] == pytest.approx([min(1, 2 * min(p)), max(min(1, 2 * min(p)), max(p))])
    assert out[0]["significant"] and not out[1]["significant"]
    # on the model means (3 points, 1 degree of freedom): the same slope, a wider interval
    means = out[0]["on_means"]
    assert means["n"] == 3 and means["slope"] == pytest.approx(out[0]["slope"], rel=1e-12)
    assert means["ci_high"] - means["ci_low"] > out[0]["ci_high"] - out[0]["ci_low"]


# ------------------------------------------------------------------------------------------- the paper's points


def test_paper_points_are_table_ii_with_the_cifar100_weight_counts():
    paper = capacity.paper_differences()
    assert [(p["column"], round(100 * p["diff"], 6)) for p in paper] == [("D", 1.5), ("C", 1.1), ("B", 0.2),
                                                                         ("A", 0.0)]
    assert capacity.paper_trend()["slope"] < 0  # the paper's claim: the smaller the network, the larger the lead


def test_paper_weight_counts_are_the_models_at_full_width_on_cifar100():
    import estimators
    from workers.models import create_model

    for model, weights in capacity.PAPER_WEIGHTS.items():
        net = create_model(model, num_classes=100, input_shape=(3, 32, 32), w_bits=1, a_bits=1, estimator="aqe")
        assert estimators.weight_storage(net).quantized_weights == weights, model


def test_the_figure_draws_our_intervals_and_the_papers_points():
    rows = [{"candidate": "aqe", "baseline": "clipped_ste", "bits": "W1A1", "model": m, "weights": w,
             "log2_weights": math.log2(w), "diff": d, "ci_low": d - 0.01, "ci_high": d + 0.02, "differences": [d, d]}
            for m, w, d in (("convnet_d width_divisor 8", 28_488, 0.02), ("convnet_a width_divisor 8", 162_960, 0.0))]
    fig = capacity.lead_figure(rows, capacity.trends(rows))
    assert fig.layout.title.text == "AQE's lead vs capacity"
    ours, = [t for t in fig.data if t.meta["kind"] == "ours"]
    assert list(ours.y) == pytest.approx([2.0, 0.0]) and list(ours.error_y.array) == pytest.approx([2.0, 2.0])
    assert list(ours.error_y.arrayminus) == pytest.approx([1.0, 1.0])
    paper, = [t for t in fig.data if t.meta["kind"] == "paper"]
    assert "CIFAR-100" in paper.name and "Table II" in paper.name
    assert list(paper.y) == pytest.approx([1.5, 1.1, 0.2, 0.0])
    assert list(paper.x) == pytest.approx([math.log2(w) for w in (1_825_472, 2_637_504, 4_654_784, 10_444_160)])
    assert [t.meta["kind"] for t in fig.data].count("trend") == 1


# ------------------------------------------------------------------- the report over runs in a real database

WEIGHTS = {"convnet_b": 72_456, "convnet_c": 41_096, "convnet_d": 28_488}  # at width_divisor 8 (Fashion-MNIST)
# AQE − clipped STE at W1A1 per seed (points): the lead grows as the model shrinks
LEAD = {"convnet_b": [0.5, 1.0, 1.5], "convnet_c": [1.5, 2.0, 2.0], "convnet_d": [2.5, 3.0, 4.0]}
FLOAT_ACC = {"convnet_b": 0.91, "convnet_c": 0.90, "convnet_d": 0.88}


def spec(model: str) -> dict:
    return {"name": f"capacity <test>: {model}", "dataset": "fashion_mnist", "model": model,
            "model_options": {"width_divisor": 8}, "estimators": ["aqe", "clipped_ste"], "bits": [{"w": 1, "a": 1}],
            "include_full_precision": True, "seeds": [0, 1, 2], "epochs": 2}


def store_model_run(sessions, model: str) -> int:
    """One model's run, every trial done through the SQL sink: clipped STE at 80 %, AQE ``LEAD`` ahead."""
    with sessions() as s:
        run_id = store.create_run(s, parse_spec(spec(model)))[0]["id"]
    sink = SqlSink(sessions, run_id)
    with sessions() as s:
        trials = store.list_trials(s, run_id)
    for t in trials:
        acc = 0.80 + (LEAD[model][t["seed"]] / 100 if t["estimator"] == "aqe" else 0.0)
        acc = FLOAT_ACC[model] if t["estimator"] == "float" else acc
        sink.on_trial_start(t["key"], {"device": "cpu", "attempt": 1})
        for epoch in (1, 2):
            sink.on_epoch(t["key"], {"epoch": epoch, "test_acc": acc - 0.1 / epoch, "val_acc": acc,
                                     "val_acc_soft": acc - 0.05 / epoch if t["estimator"] == "aqe" else None})
        bits = 0 if t["estimator"] == "float" else WEIGHTS[model]
        sink.on_trial_end(t["key"], "done", {"final_test_acc": acc, "final_val_acc": acc, "best_val_acc": acc,
                                             "weight_bits_total": bits, "bn_reestimated": True,
                                             "last_epoch_test_acc": acc - 0.01}, None)
    with sessions() as s:
        assert store.finish_run(s, run_id, "done")
    return run_id


def expected_trend() -> dict:
    x = [math.log2(WEIGHTS[m]) for m in LEAD for _ in LEAD[m]]
    return capacity.trend(x, [d / 100 for m in LEAD for d in LEAD[m]])


def test_the_capacity_section_appears_for_several_model_sizes(sessions, tmp_path):
    ids = [store_model_run(sessions, m) for m in LEAD]
    with sessions() as s:
        files = build_report(s, ids, tmp_path / "study", png=False)
    md = files["RESULTS.md"].read_text()
    assert "## AQE's lead vs capacity" in md and "This report covers 3 runs together" in md
    # each model's own full-precision reference, never one pooled over the sizes
    assert "Full-precision reference per model:\nconvnet_b width_divisor 8: 91.00 ± 0.00 % (n = 3);\n" in md
    assert "convnet_d width_divisor 8: 88.00 ± 0.00 % (n = 3).\n" in md and "Full-precision reference:" not in md
    # BatchNorm re-estimation per model too: +1 point on each model's 3 trials
    assert "| convnet_b width_divisor 8 · W1A1 | `aqe` | 3 |" in md
    assert "| convnet_d width_divisor 8 · float | `float` | 3 |" in md
    assert md.startswith("# capacity <test>\n")  # the runs' names' shared part, cut at a separator
    assert list(files).index("aqe_lead_vs_capacity.html") < list(files).index("training_curves_convnet_b"
                                                                               "_width_divisor_8.html")
    # per model, by size: the paired difference over seeds with its interval (mean of LEAD)
    d_row = re.search(r"^\| convnet_d width_divisor 8 \| 28,488 \| 14\.80 \| \+3\.17 \[[^]]+\] [†]? ?\|$", md, re.M)
    assert d_row, md
    assert md.index("| convnet_d width_divisor 8 | 28,488") < md.index("| convnet_b width_divisor 8 | 72,456")
    # the paired tests name their model
    assert "| `aqe` | `clipped_ste` | convnet_c width_divisor 8 · W1A1 | 0,1,2 | +1.83 |" in md
    fit = expected_trend()
    assert fit["slope"] < 0
    ci = f"[{100 * fit['ci_low']:+.2f}, {100 * fit['ci_high']:+.2f}]"
    assert f"| `aqe` | `clipped_ste` | W1A1 | 3 | 9 | {100 * fit['slope']:+.2f} | {ci} | {fit['p_value']:.3f} |" in md
    x = [math.log2(WEIGHTS[m]) for m in LEAD]
    on_means = capacity.trend(x, [sum(LEAD[m]) / 300 for m in LEAD])
    assert f"| final | {100 * on_means['slope']:+.2f}, [{100 * on_means['ci_low']:+.2f}, " \
           f"{100 * on_means['ci_high']:+.2f}], p {on_means['p_value']:.3f} |" in md
    assert "paper, Table II: AQE − STE (CIFAR-100, full width, W1A1)" in md
    assert "| Model D (`convnet_d`) | 1,825,472 |" in md
    tex = files["capacity.tex"].read_text()
    assert r"convnet\_d width\_divisor 8 & 28,488 & +3.17 [" in tex and "Trend per doubling" in tex
    assert f"{100 * fit['slope']:+.2f} [" in tex
    figure = files["aqe_lead_vs_capacity.html"].read_text()
    assert "AQE's lead vs capacity" in figure and "CIFAR-100" in figure
    # each model's own curves, the soft forward's validation accuracy among them
    assert {"training_curves_convnet_b_width_divisor_8.html",
            "validation_curves_convnet_d_width_divisor_8.html"} <= set(files)
    assert isinstance(__import__("json").loads(files["spec.json"].read_text()), list)


def test_one_model_has_no_capacity_section(sessions, tmp_path):
    run_id = store_model_run(sessions, "convnet_c")
    with sessions() as s:
        files = build_report(s, run_id, tmp_path / "one", png=False)
    md = files["RESULTS.md"].read_text()
    assert "AQE's lead vs capacity" not in md and "capacity.tex" not in files
    assert "| `aqe` | `clipped_ste` | W1A1 | 0,1,2 | +1.83 |" in md  # the run's own table, as before
    assert "training_curves.html" in files


@pytest.fixture
def client(db_url):
    with ExitStack() as stack:
        yield stack.enter_context(TestClient(create_app(Settings(database_url=db_url))))


def test_the_api_and_the_cli_report_several_runs_together(client, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from service import cli

    ids = [store_model_run(client.app.state.session_factory, m) for m in LEAD]
    r = client.get(f"/runs/{ids[0]}/report", params={"png": False, "also": ids[1:]})
    assert r.status_code == 200, r.text
    prefix = "bitbench-runs-" + "-".join(map(str, ids))
    assert f'filename="{prefix}.zip"' in r.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert "## AQE's lead vs capacity" in z.read(f"{prefix}/RESULTS.md").decode()
        assert f"{prefix}/capacity.tex" in z.namelist()
    missing = client.get(f"/runs/{ids[0]}/report", params={"png": False, "also": [ids[1], 999]})
    assert missing.status_code == 404
    assert missing.json()["detail"][0]["loc"] == ["query", "also"] and "run 999 not found" in missing.text
    bad = client.get(f"/runs/{ids[0]}/report", params={"also": [0]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "also", 0]

    # the CLI asks for the same report: its HTTP client is pointed at the app
    monkeypatch.setattr(cli.Client, "_send",
                        lambda self, method, path, timeout=None, **kw: client.request(method, path, **kw))
    result = CliRunner().invoke(cli.app, ["report", *map(str, ids), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "AQE's lead vs capacity" in (tmp_path / prefix / "RESULTS.md").read_text()

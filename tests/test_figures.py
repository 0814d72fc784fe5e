"""Figures and paper reference data from hand-made records."""

from __future__ import annotations

import math
from itertools import count

import pytest

from dashboard import figures
from dashboard.paper_results import paper_points

_IDS = count(1)


def trial(estimator, w, a, seed, acc, label=None, status="done"):
    return {"id": next(_IDS), "run_id": 1, "estimator": estimator,
            "estimator_label": label or estimator, "w_bits": w, "a_bits": a, "seed": seed, "status": status,
            "final_test_acc": acc if status == "done" else None}


# aqe: 3 configs × 2 seeds, ste: 2 configs (one with 3 seeds), float reference: 2 seeds.
TRIALS = [
    trial("aqe", 2, 1, 0, 0.80), trial("aqe", 2, 1, 1, 0.84),
    trial("aqe", 1, 1, 0, 0.70), trial("aqe", 1, 1, 1, 0.74),
    trial("aqe", 3, 3, 0, 0.90), trial("aqe", 3, 3, 1, 0.91),
    trial("ste", 1, 2, 0, 0.60), trial("ste", 1, 2, 1, 0.66), trial("ste", 1, 2, 2, 0.69),
    trial("ste", 1, 1, 0, 0.65),
    trial("ste", 2, 2, 0, None, status="running"),
    trial("float", 32, 32, 0, 0.93), trial("float", 32, 32, 1, 0.95),
]


def traces(fig, kind):
    return [t for t in fig.data if (t.meta or {}).get("kind") == kind]


def test_one_trace_per_estimator_with_points_per_config():
    fig = figures.accuracy_vs_bits(TRIALS)
    est = {t.name: t for t in traces(fig, "estimator")}
    assert sorted(est) == ["aqe", "ste"]
    assert list(est["aqe"].x) == ["W1A1", "W2A1", "W3A3"]
    assert list(est["ste"].x) == ["W1A1", "W1A2"]  # the running trial has no point
    assert len(traces(fig, "float")) == 1 and not traces(fig, "paper")


def test_x_order_total_bits_then_weight_bits_float_last():
    assert list(figures.accuracy_vs_bits(TRIALS).layout.xaxis.categoryarray) == [
        "W1A1", "W1A2", "W2A1", "W3A3", "float"]
    configs = [(3, 3), (2, 2), (1, 2), (32, 32), (2, 1), (1, 1), (1, 32), (3, 1)]
    assert [figures.config_label(c) for c in sorted(configs, key=figures.config_sort_key)] == [
        "W1A1", "W1A2", "W2A1", "W2A2", "W3A1", "W3A3", "W1A32", "float"]


def test_means_and_error_bars_are_sample_std():
    est = {t.name: t for t in traces(figures.accuracy_vs_bits(TRIALS), "estimator")}
    aqe, ste = est["aqe"], est["ste"]
    assert list(aqe.y) == pytest.approx([0.72, 0.82, 0.905])
    # sample std of two values = |a - b| / sqrt(2)
    assert list(aqe.error_y.array) == pytest.approx([0.04 / math.sqrt(2), 0.04 / math.sqrt(2), 0.01 / math.sqrt(2)])
    mean = (0.60 + 0.66 + 0.69) / 3
    std = math.sqrt(((0.60 - mean) ** 2 + (0.66 - mean) ** 2 + (0.69 - mean) ** 2) / 2)
    assert list(ste.y) == pytest.approx([0.65, mean])
    assert list(ste.error_y.array) == pytest.approx([0.0, std])  # one seed: no spread


def test_float_line_is_mean_of_float_trials():
    fig = figures.accuracy_vs_bits(TRIALS)
    (line,) = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert line.y0 == line.y1 == pytest.approx(0.94)
    (ref,) = traces(fig, "float")
    assert list(ref.x) == ["float"] and list(ref.y) == pytest.approx([0.94])


def test_no_float_trials_no_line():
    fig = figures.accuracy_vs_bits([t for t in TRIALS if t["estimator"] != "float"])
    assert not fig.layout.shapes and not traces(fig, "float")
    assert "float" not in fig.layout.xaxis.categoryarray


def test_paper_markers_only_at_the_runs_configs():
    fig = figures.accuracy_vs_bits(TRIALS, paper_points("cifar10", "convnet_a"))
    paper = {t.meta["estimator"]: t for t in traces(fig, "paper")}
    assert sorted(paper) == ["aqe", "float"]
    # Table I, Model A: W1A1 (M=1, N=1) 0.884, W1A2 (M=2, N=1) 0.891, W2A1 (M=1, N=2) 0.889, W3A3 0.906
    expected = {"W1A1": 0.884, "W1A2": 0.891, "W2A1": 0.889, "W3A3": 0.906}
    assert dict(zip(paper["aqe"].x, paper["aqe"].y, strict=True)) == expected
    assert list(paper["float"].y) == [0.918]
    assert len(traces(fig, "estimator")) == 2  # paper traces do not count as estimators


def test_paper_markers_absent_for_other_dataset_or_model():
    assert paper_points("mnist", "convnet_a") == [] and paper_points("cifar10", "resnet18") == []
    fig = figures.accuracy_vs_bits(TRIALS, paper_points("mnist", "mlp"))
    assert not traces(fig, "paper")


def test_ste_paper_row_on_cifar100():
    fig = figures.accuracy_vs_bits(TRIALS, paper_points("cifar100", "convnet_d"))
    paper = {t.meta["estimator"]: t for t in traces(fig, "paper")}
    assert list(paper["ste"].x) == ["W1A1"] and list(paper["ste"].y) == [0.515]


@pytest.mark.parametrize("dataset, model, w, a, estimator, acc", [
    ("cifar10", "convnet_a", 1, 1, "aqe", 0.884),
    ("cifar10", "convnet_d", 3, 3, "aqe", 0.893),
    ("cifar10", "convnet_b", 3, 16, "aqe", 0.901),    # M=16, N=3
    ("cifar10", "convnet_c", 16, 1, "aqe", 0.870),    # M=1, N=16
    ("cifar10", "convnet_c", 32, 32, "float", 0.912),
    ("cifar100", "convnet_a", 3, 2, "aqe", 0.631),    # the paper's best setting, W3A2
    ("cifar100", "convnet_d", 1, 1, "ste", 0.515),
    ("cifar100", "convnet_c", 1, 1, "aqe", 0.546),
    ("cifar100", "convnet_b", 2, 3, "aqe", 0.582),    # M=3, N=2
    ("CIFAR100", "convnet_b", 32, 32, "float", 0.634),
])
def test_paper_values_match_tables(dataset, model, w, a, estimator, acc):
    found = [p["acc"] for p in paper_points(dataset, model)
             if (p["w_bits"], p["a_bits"], p["estimator"]) == (w, a, estimator)]
    assert found == [acc]


def test_paper_table_sizes():
    assert len(paper_points("cifar10", "convnet_a")) == 16
    points = paper_points("cifar100", "convnet_a")
    assert len(points) == 17 and sum(p["estimator"] == "ste" for p in points) == 1


# Tables III–V as printed (reference/aqe_paper.md §4): (dataset, model, method, W, A, top-1, top-5 accuracy)
@pytest.mark.parametrize("dataset, model, method, w, a, acc, top5", [
    ("cifar10", "resnet110", "minw_aqe", 3, 32, 1 - 0.0705, None),      # Table III error 7.05
    ("cifar100", "resnet110", "float", 32, 32, 1 - 0.3587, None),       # 35.87
    ("cifar10", "densenet100", "float", 32, 32, 1 - 0.0451, None),      # 4.51
    ("CIFAR100", "densenet100", "minw_aqe", 3, 32, 1 - 0.2370, None),   # 23.70
    ("imagenet", "alexnet_bn", "binaryconnect", 1, 32, 0.566 - 0.198, 0.802 - 0.182),  # Table IV loss 19.8 / 18.2
    ("imagenet", "alexnet_bn", "bnn", 1, 1, 0.566 - 0.287, 0.802 - 0.298),
    ("imagenet", "alexnet_bn", "tnn", 2, 8, 0.566 - 0.076, 0.802 - 0.074),
    ("imagenet", "alexnet_bn", "dorefa", 8, 8, 0.566 - 0.036, 0.802 - 0.034),
    ("imagenet", "alexnet_bn", "minw_aqe", 3, 8, 0.566 - 0.006, 0.802 - 0.007),
    ("imagenet", "alexnet_bn", "float", 32, 32, 0.566, 0.802),           # the baseline, cited from XNOR-Net
    ("imagenet", "resnet18", "float", 32, 32, 1 - 0.3046, 1 - 0.1081),  # Table V error 30.46 / 10.81
    ("imagenet", "resnet18", "hwgq", 1, 2, 1 - 0.4040, 1 - 0.1780),
    ("imagenet", "resnet18", "twn", 2, 32, 1 - 0.3820, 1 - 0.1580),
    ("imagenet", "resnet18", "xnor_net", 1, 1, 1 - 0.4880, 1 - 0.2680),
    ("imagenet", "resnet18", "rounding", 4, 4, 1 - 0.7879, 1 - 0.5710),
    ("imagenet", "resnet18", "minw_aqe", 1, 1, 1 - 0.4787, 1 - 0.2604),
])
def test_comparison_tables_match_the_paper(dataset, model, method, w, a, acc, top5):
    found = [(p["acc"], p["top5_acc"]) for p in paper_points(dataset, model)
             if (p["w_bits"], p["a_bits"], p["estimator"]) == (w, a, method)]
    assert len(found) == 1
    assert found[0][0] == pytest.approx(acc, abs=1e-9)
    assert found[0][1] == (None if top5 is None else pytest.approx(top5, abs=1e-9))


def test_comparison_table_sizes_and_footnotes():
    assert [len(paper_points(d, m)) for d, m in [("cifar10", "resnet110"), ("cifar100", "resnet110"),
                                                  ("cifar10", "densenet100"), ("cifar100", "densenet100")]] == [2] * 4
    assert len(paper_points("imagenet", "alexnet_bn")) == 13 + 1  # + the float baseline
    table5 = paper_points("imagenet", "resnet18")
    assert len(table5) == 27 and {p["source"] for p in table5} == {"Table V"}
    (hwgq,) = [p for p in table5 if p["estimator"] == "hwgq"]
    assert hwgq["note"] == "HWGQ, first layer float, last layer float, modified architecture"
    assert paper_points("imagenet", "convnet_a") == [] and paper_points("cifar10", "alexnet_bn") == []


def test_comparison_points_overlay_the_runs_configs():
    runs = [trial("twn", 2, 32, 0, 0.6), trial("minw_aqe", 1, 1, 0, 0.5), trial("float", 32, 32, 0, 0.7)]
    fig = figures.accuracy_vs_bits(runs, paper_points("imagenet", "resnet18"))
    paper = {t.meta["estimator"]: dict(zip(t.x, t.y, strict=False)) for t in traces(fig, "paper")}
    assert paper == {  # every Table V system at the runs' configurations, none elsewhere (rounded to 1e-6)
        "twn": {"W2A32": 0.618}, "minw_aqe": {"W1A1": 0.5213, "W2A32": 0.6364}, "xnor_net": {"W1A1": 0.512},
        "lq_nets": {"W2A32": 0.68}, "lr_net": {"W2A32": 0.635}, "elq": {"W2A32": 0.6752}, "float": {"float": 0.6954}}


def test_heatmap_matrix():
    w, a, z = figures.heatmap_matrix(TRIALS, "aqe")
    assert (w, a) == ([1, 2, 3], [1, 3])
    assert z == [[pytest.approx(0.72), None], [pytest.approx(0.82), None], [None, pytest.approx(0.905)]]
    fig = figures.bits_heatmap(TRIALS, "aqe")
    (hm,) = fig.data
    assert list(hm.x) == ["A1", "A3"] and list(hm.y) == ["W1", "W2", "W3"]
    assert hm.z[0][0] == pytest.approx(0.72) and hm.z[0][1] is None
    assert hm.text[2][1] == "90.5%"


def test_training_curves_panels():
    metrics = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5 + e / 10, "val_acc": 0.5, "test_acc": 0.5,
                "lr": 0.01, "schedule": {"aqe.alpha": e / 3}} for e in (3, 1, 2)]
    fig = figures.training_curves({"metrics": metrics})
    keys = [t.meta["key"] for t in fig.data]
    assert keys == ["train_loss", "train_acc", "val_acc", "test_acc", "lr", "schedule.aqe.alpha"]
    alpha = fig.data[-1]
    assert list(alpha.x) == [1, 2, 3] and list(alpha.y) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert alpha.xaxis == "x4"


def test_user_text_is_escaped_in_figures():
    fig = figures.accuracy_vs_bits([trial("ste", 1, 1, 0, 0.5, label="<b>x</b>")])
    assert fig.data[0].name == "&lt;b&gt;x&lt;/b&gt;" and fig.data[0].meta["estimator"] == "<b>x</b>"

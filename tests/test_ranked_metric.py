"""Ranking by the final or the validation-selected accuracy: API, dashboard pages and the report.

One run, stored through the SQL sink, in which the two metrics rank the estimators in opposite
orders: ``aqe`` ends higher, ``ste`` peaked higher on validation and then lost points.
"""
from __future__ import annotations

import re

import pytest

from service.report import build_report
from tests.test_api import make_api  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)

SPEC = {"name": "ranked", "estimators": ["aqe", "ste"], "bits": [{"w": 1, "a": 1}], "seeds": [0, 1, 2],
        "epochs": 3, "include_full_precision": False, "bn_reestimate": True}
# per (label, seed): test accuracy by epoch (validation = test here), and the re-estimated final
EPOCHS = {("aqe", 0): [0.70, 0.78, 0.80], ("aqe", 1): [0.71, 0.79, 0.82], ("aqe", 2): [0.72, 0.80, 0.84],
          ("ste", 0): [0.70, 0.90, 0.75], ("ste", 1): [0.72, 0.89, 0.88], ("ste", 2): [0.70, 0.91, 0.76]}
REESTIMATED = {("aqe", 0): 0.81, ("aqe", 1): 0.82, ("aqe", 2): 0.86,
               ("ste", 0): 0.79, ("ste", 1): 0.88, ("ste", 2): 0.80}


@pytest.fixture
def ranked(make_api):  # noqa: F811
    api = make_api()
    run = api.post_run(SPEC)
    sink = api.sink(run["id"])
    for (label, seed), accs in EPOCHS.items():
        key = f"{label}-w1a1-s{seed}"
        sink.on_trial_start(key, {"device": "cpu", "attempt": 1})
        for epoch, acc in enumerate(accs, 1):
            sink.on_epoch(key, {"epoch": epoch, "val_acc": acc, "test_acc": acc, "test_top5": (1 + acc) / 2,
                                "weight_flips": 0.1 / epoch})
        best = max(range(len(accs)), key=lambda i: (accs[i], -i))
        sink.on_trial_end(key, "done", {
            "final_test_acc": REESTIMATED[(label, seed)], "final_val_acc": REESTIMATED[(label, seed)],
            "last_epoch_test_acc": accs[-1], "last_epoch_val_acc": accs[-1], "bn_reestimated": True,
            "best_val_acc": accs[best], "best_epoch": best + 1, "selected_test_acc": accs[best],
            "selected_epoch": best + 1, "epochs": 3}, None)
    return api, run["id"]


def test_the_api_ranks_by_either_metric_and_says_which(ranked):
    api, rid = ranked
    final = api.get("/leaderboard", params={"run_id": rid}).json()
    selected = api.get("/leaderboard", params={"run_id": rid, "metric": "selected"}).json()
    assert [(r["estimator_label"], r["rank"], r["metric"]) for r in final] == [("aqe", 1, "final"),
                                                                               ("ste", 2, "final")]
    assert [(r["estimator_label"], r["rank"], r["metric"]) for r in selected] == [("ste", 1, "selected"),
                                                                                  ("aqe", 2, "selected")]
    assert final[0]["mean"] == pytest.approx((0.81 + 0.82 + 0.86) / 3)
    assert selected[0]["mean"] == pytest.approx(0.90)
    r = api.get("/leaderboard", params={"metric": "best_test"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "metric"]

    trial = next(t for t in api.get(f"/runs/{rid}/trials").json() if t["key"] == "ste-w1a1-s0")
    assert (trial["key"], trial["selected_test_acc"], trial["selected_epoch"]) == ("ste-w1a1-s0", 0.90, 2)
    detail = api.get(f"/trials/{trial['id']}").json()
    assert [m["weight_flips"] for m in detail["metrics"]] == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert [m["test_top5"] for m in detail["metrics"]] == pytest.approx([0.85, 0.95, 0.875])


def test_dashboard_pages_follow_the_metric(ranked):
    api, rid = ranked
    page = api.get("/dashboard/leaderboard", params={"metric": "selected"}).text
    assert 'data-metric="selected"' in page and '<option value="selected" selected>' in page
    ranks = re.findall(r'data-rank="(\d)" data-estimator="(\w+)"', page)
    assert ranks == [("1", "ste"), ("2", "aqe")]
    assert re.findall(r'data-rank="(\d)" data-estimator="(\w+)"', api.get("/dashboard/leaderboard").text) == [
        ("1", "aqe"), ("2", "ste")]
    run_page = api.get(f"/dashboard/runs/{rid}", params={"metric": "selected"}).text
    assert 'id="acc-vs-bits" data-spec="acc-vs-bits-spec" data-metric="selected"' in run_page
    assert "test accuracy at the best validation epoch" in run_page
    assert 'data-metric="final"' in api.get(f"/dashboard/runs/{rid}", params={"metric": "nonsense"}).text
    trial = next(t for t in api.get(f"/runs/{rid}/trials").json() if t["key"] == "ste-w1a1-s0")
    trial_page = api.get(f"/dashboard/trials/{trial['id']}").text
    assert "Selected test acc" in trial_page and "(epoch 2)" in trial_page and "Weight flips" in trial_page


def test_report_gives_both_rankings_late_drops_and_reestimation(ranked, tmp_path):
    api, rid = ranked
    with api.sessions() as s:
        md = build_report(s, rid, tmp_path / "r", png=False)["RESULTS.md"].read_text()
    # side by side: aqe first by final (83.00 ± 2.65), second by selected (82.00 ± 2.00)
    assert "| 1 | `aqe` **(best)** | minw | 83.00 ± 2.65 | 3 |" in md and "| 82.00 ± 2.00 | 2 |" in md
    assert re.search(r"\| 2 \| `ste` \| minw \| 82\.33 ± 4\.93 \| 3 \| [^|]+\| 90\.00 ± 1\.00 \| 1 \|", md), md
    # ste's seeds 0 and 2 ended 15 points below their selected epoch; seed 1 lost 1 point exactly (not more)
    assert "**2 of 6 trials** ended their last epoch more than 1 point" in md
    assert "| `ste-w1a1-s0` | 75.00 | 90.00 | 2 |" in md and "ste-w1a1-s1` |" not in md
    # re-estimation: ste 79.67 ± 7.23 → 82.33 ± 4.93, Δ +2.67 points
    assert "## BatchNorm re-estimation" in md
    assert "| W1A1 | `ste` | 3 | 79.67 ± 7.23 | 82.33 ± 4.93 | +2.67 |" in md
    assert "| W1A1 | `aqe` | 3 | 82.00 ± 2.00 | 83.00 ± 2.65 | +1.00 |" in md
    assert "| `aqe` | `ste` | W1A1 | 0,1,2 | +0.67 |" in md and "| selected |" in md


def test_a_methods_run_compares_the_papers_method_with_every_other_system_at_its_bits(make_api, tmp_path):  # noqa: F811
    api = make_api()
    methods = ["bnn", "xnor_net", {"name": "minw_aqe", "bits": [{"w": 1, "a": 1}]}]
    run = api.post_run({"name": "methods", "methods": methods,
                        "seeds": [0, 1], "epochs": 1, "include_full_precision": False})
    sink = api.sink(run["id"])
    accs = {"bnn": [0.80, 0.82], "xnor_net": [0.81, 0.80], "minw_aqe": [0.83, 0.84]}
    for label, values in accs.items():
        for seed, acc in enumerate(values):
            sink.on_trial_end(f"{label}-w1a1-s{seed}", "done", {"final_test_acc": acc, "selected_test_acc": acc}, None)
    with api.sessions() as s:
        md = build_report(s, run["id"], tmp_path / "r", png=False)["RESULTS.md"].read_text()
    assert "| `minw_aqe` | `bnn` | W1A1 | 0,1 | +2.50 |" in md
    assert "| `minw_aqe` | `xnor_net` | W1A1 | 0,1 | +3.00 |" in md

"""The compare page: its pure pieces (selection, recipe differences, merged leaderboards) and the
page itself over the in-memory FakeSource (curves of every run, differences, escaping, 4xx)."""
from __future__ import annotations

import json
import re

import pytest
from test_dashboard_pages import SCRIPT_NAME, client, source  # noqa: F401  (fixtures)

from dashboard import compare

SPEC = {"name": "a", "dataset": "cifar10", "model": "convnet_a", "estimators": ["ste"], "seeds": [0, 1],
        "epochs": 10, "batch_size": 128, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "lr_schedule": {"name": "exponential", "gamma": 0.98, "milestones": []}, "first_last_float": False,
        "dataset_options": {"val_size": 5000}}


# ---------------------------------------------------------------- pure pieces

@pytest.mark.parametrize(("values", "ids"), [(["1", "2"], [1, 2]), (["3", "1", "3", "2"], [3, 1, 2]),
                                             ([str(i) for i in range(1, 9)], list(range(1, 9)))])
def test_selection(values, ids):
    assert compare.parse_selection(values) == ids


@pytest.mark.parametrize(("values", "reason"), [
    ([], "between 2 and 8 different runs"), (["1"], "1 given"), (["4", "4"], "1 given"),
    ([str(i) for i in range(1, 10)], "9 given"), (["1", "x"], "positive integer run id, not 'x'"),
    (["1", "0"], "not '0'"), (["1", "-2"], "not '-2'"), (["1", "²"], "not '²'"), (["1", ""], "not ''")])
def test_bad_selection_says_why(values, reason):
    with pytest.raises(compare.BadSelection, match=re.escape(reason)):
        compare.parse_selection(values)


def test_recipe_differences_list_only_what_differs_in_recipe_order():
    other = {**SPEC, "name": "b", "estimators": ["aqe"], "seeds": [0], "epochs": 20,
             "optimizer": {**SPEC["optimizer"], "lr": 0.1}, "dataset_options": {}, "first_last_float": True}
    assert compare.recipe_differences([SPEC, other]) == [
        ("dataset_options.val_size", [5000, None]), ("epochs", [10, 20]), ("optimizer.lr", [0.01, 0.1]),
        ("first_last_float", [False, True])]  # name, estimators and seeds are the grid, not the recipe
    assert compare.recipe_differences([SPEC, dict(SPEC, name="c")]) == []
    three = compare.recipe_differences([SPEC, SPEC, {**SPEC, "lr_schedule": {"name": "cosine", "eta_min": 0.0}}])
    assert three == [("lr_schedule.eta_min", [None, None, 0.0]), ("lr_schedule.gamma", [0.98, 0.98, None]),
                     ("lr_schedule.milestones", [[], [], None]), ("lr_schedule.name", ["exponential"] * 2 + ["cosine"])]
    assert compare.recipe_differences([None, {"epochs": 3}]) == [("epochs", [None, 3])]


def test_recipe_values_as_text():
    assert [compare.recipe_value(v) for v in (None, "adam", 0.1, False, [3, 6], {"a": 1})] == [
        "—", "adam", "0.1", "false", "[3, 6]", '{"a": 1}']


def test_side_by_side_aligns_rows_by_bits_and_estimator():
    def row(w, a, label, mean):
        return {"w_bits": w, "a_bits": a, "estimator_label": label, "mean": mean}

    first = [row(1, 1, "ste", 0.8), row(32, 32, "float", 0.9), row(2, 2, "ste", 0.85)]
    second = [row(1, 1, "aqe", 0.82), row(1, 1, "ste", 0.81)]
    merged = compare.side_by_side([first, second])
    assert [(r["w_bits"], r["a_bits"], r["estimator_label"]) for r in merged] == [
        (1, 1, "aqe"), (1, 1, "ste"), (2, 2, "ste"), (32, 32, "float")]
    assert [[c and c["mean"] for c in r["cells"]] for r in merged] == [
        [None, 0.82], [0.8, 0.81], [0.85, None], [0.9, None]]


# ---------------------------------------------------------------- the page

def _figure(body: str, element_id: str) -> dict:
    spec = re.search(rf'<script type="application/json" id="{element_id}-spec">(.*?)</script>', body, re.S)
    return json.loads(spec.group(1).replace("<\\/", "</"))


def test_compare_page_shows_both_runs(client, source):  # noqa: F811
    source.runs[2]["spec"] = {**source.runs[1]["spec"], "dataset": "cifar100", "model": "convnet_d", "epochs": 5,
                              "optimizer": {"lr": 0.1}}
    r = client.get("/dashboard/compare?run=1&run=2")
    assert r.status_code == 200, r.text[:300]
    body = r.text
    assert re.findall(r'<div class="compare-panel" data-run-id="(\d+)"', body) == ["1", "2"]
    for i, run_id in enumerate((1, 2)):
        fig = _figure(body, f"acc-vs-bits-{i}")
        finished = [t for t in source.run_results(run_id)]
        labels = {t["estimator_label"] for t in finished if t["estimator"] != "float"}
        assert {t["meta"]["estimator"] for t in fig["data"] if t["meta"]["kind"] == "estimator"} == labels
    assert _figure(body, "acc-vs-bits-0")["layout"]["yaxis"]["range"] == \
        _figure(body, "acc-vs-bits-1")["layout"]["yaxis"]["range"]  # one scale for all
    fields = re.findall(r'<tr data-field="([^"]+)">', body)
    assert fields == ["dataset", "model", "epochs", "optimizer.lr"]
    assert re.search(r'<tr data-field="epochs">.*?<td>3</td><td>5</td>', body)
    # the side-by-side leaderboard: run 1's ewgs leads W1A1; run 2 has no ewgs there
    cells = re.search(r'<tr class="entry" data-estimator="ewgs" data-bits="W1A1">(.*?)</tr>', body, re.S).group(1)
    assert 'data-run-id="1" data-rank="1"' in cells and re.search(r'data-run-id="2">—', cells)
    # hostile run and estimator names are text
    assert SCRIPT_NAME not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in body
    assert "protocol" not in body  # no run has a protocol label


def test_compare_page_shows_protocol_labels_where_runs_have_them(client, source):  # noqa: F811
    source.runs[1]["protocol_label"] = "cifar10 · convnet_a · 3 ep"
    source.runs[2]["protocol_label"] = "<b>p2</b>"
    body = client.get("/dashboard/compare?run=2&run=1").text
    assert re.findall(r'<span class="protocol">(.*?)</span>', body) == ["&lt;b&gt;p2&lt;/b&gt;",
                                                                        "cifar10 · convnet_a · 3 ep"]
    assert "differences-empty" not in body


def test_same_recipe_says_so(client, source):  # noqa: F811
    source.runs[2]["spec"] = dict(source.runs[1]["spec"])
    body = client.get("/dashboard/compare?run=1&run=2").text
    assert 'id="differences-empty"' in body and 'id="differences"' not in body


@pytest.mark.parametrize(("query", "status", "reason"), [
    ("", 400, "Pick between 2 and 8 different runs to compare"), ("?run=1", 400, "1 given"),
    ("?run=1&run=1", 400, "1 given"), ("?run=1&run=abc", 400, "not &#x27;abc&#x27;"),
    ("?" + "&".join(f"run={i}" for i in range(1, 10)), 400, "9 given"),
    ("?run=1&run=99", 404, "There is no run 99."), ("?run=98&run=1&run=99", 404, "There is no run 98, 99."),
    ("?run=1&run=99999999999", 404, "There is no run 99999999999.")])
def test_bad_selections_are_4xx_with_a_reason(client, query, status, reason):  # noqa: F811
    r = client.get(f"/dashboard/compare{query}")
    assert r.status_code == status
    assert reason in re.search(r'<p id="problem">(.*?)</p>', r.text).group(1)


def test_runs_page_form_sends_checked_runs_to_compare(client):  # noqa: F811
    body = client.get("/dashboard/").text
    form = re.search(r'<form method="get" action="/dashboard/compare" id="compare-form">(.*?)</form>', body, re.S)
    assert form, body[:2000]
    assert re.findall(r'<input type="checkbox" name="run" value="(\d+)"', form.group(1)) == ["2", "1"]
    assert 'type="submit"' in form.group(1)
    # the run page links to the runs page with this run already checked
    run_page = client.get("/dashboard/runs/1").text
    assert 'id="compare-link" href="/dashboard/?run=1"' in run_page
    checked = client.get("/dashboard/?run=1").text
    assert re.findall(r'value="(\d+)" aria-label="[^"]*" checked', checked) == ["1"]


def test_selection_outside_the_shown_page_is_kept(source, monkeypatch):  # noqa: F811
    from fastapi.testclient import TestClient
    from test_dashboard_pages import make_app

    from dashboard import pages

    monkeypatch.setattr(pages, "RUNS_PER_PAGE", 1)
    with TestClient(make_app(source)) as c:
        body = c.get("/dashboard/?run=1").text  # page 1 shows run 2 only
        assert '<input type="hidden" name="run" value="1">' in body
        assert 'href="/dashboard/?offset=1&amp;run=1">older' in body

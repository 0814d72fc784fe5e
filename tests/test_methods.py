"""workers.methods: the named comparison systems of the paper's Tables III–V, and one epoch of each."""
from __future__ import annotations

import math

import pytest

import estimators
from estimators.catalog import replace_block
from workers.datasets import load_dataset
from workers.methods import END, START, catalog_markdown, get_method, list_methods, method_catalog
from workers.spec import parse_spec
from workers.train import build_model, run_trial

REQUIRED = {"bnn", "binaryconnect", "bwn", "xnor_net", "twn", "tnn", "dorefa", "hwgq", "lq_nets", "minw_aqe"}
SETTINGS = [(name, s) for name in list_methods() for s in get_method(name).settings()]
SYNTHETIC = {"shape": [1, 8, 8], "num_classes": 4, "n_train": 192, "n_val": 32, "n_test": 64, "separation": 1.0}


def test_registry_holds_the_papers_comparison_systems():
    assert REQUIRED <= set(list_methods())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_method_estimator_params_and_bits_validate(name):
    m = get_method(name)
    estimators.validate_estimator_params(m.estimator, m.params)
    assert m.cells and m.citation and any(str(y) in m.citation for y in range(2013, 2025))
    for w, a in m.bit_cells():
        assert w in (*estimators.SUPPORTED_BITS, 32) and a in (*estimators.SUPPORTED_BITS, 32)


@pytest.mark.parametrize("name, estimator, params, cells", [
    ("bnn", "clipped_ste", {}, [(1, 1)]),
    ("binaryconnect", "ste", {}, [(1, 32)]),
    ("bwn", "xnor", {}, [(1, 32)]),
    ("xnor_net", "xnor", {}, [(1, 1)]),
    ("twn", "xnor", {"scale": "twn"}, [(2, 32)]),
    ("tnn", "xnor", {"scale": "twn"}, [(2, 8)]),               # Table IV: TNN (Mellempudi) W2/A8
    ("dorefa", "dorefa", {}, [(1, 1), (1, 2), (8, 8), (1, 4)]),  # Table IV, then Table V
    ("hwgq", "hwgq", {}, [(1, 2)]),
    ("lq_nets", "lq_nets", {}, [(2, 32), (3, 32), (1, 2)]),
    ("minw_aqe", "aqe", {}, [(3, 32), (1, 32), (2, 32), (1, 1), (1, 2), (2, 8), (3, 8)]),
])
def test_methods_spell_the_cited_systems(name, estimator, params, cells):
    m = get_method(name)
    assert (m.estimator, m.params, m.bit_cells()) == (estimator, params, cells)


def test_first_last_policy_follows_table_v_footnotes():
    assert {n for n in list_methods() if get_method(n).first_last_float} == {"dorefa", "hwgq", "lq_nets"}
    aqe = {(s["w_bits"], s["a_bits"]): s["first_last_float"] for s in get_method("minw_aqe").settings()}
    assert aqe[(1, 2)] is True and aqe[(1, 1)] is False and aqe[(3, 32)] is False


def test_unknown_method_lists_the_known():
    with pytest.raises(estimators.UnknownNameError, match=r"unknown method 'xnor'; known: binaryconnect, bnn, "):
        get_method("xnor")


def test_catalog_is_plain_data():
    cat = {m["name"]: m for m in method_catalog()}
    assert set(cat) == set(list_methods())
    twn = cat["twn"]
    assert twn["params"] == {"scale": "twn"} and twn["cells"] == [
        {"w_bits": 2, "a_bits": 32, "tables": ["IV", "V"], "first_last_float": False, "note": ""}]
    assert "Ternary Weight Networks" in twn["citation"]


def test_method_catalogue_in_readme_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert replace_block(readme, catalog_markdown(), START, END) == readme, (
        "README's method catalogue is stale: run `python -m workers.methods --write README.md`")


def method_spec(name: str, setting: dict):
    m = get_method(name)
    return parse_spec({
        "name": f"method {name}", "dataset": "synthetic", "dataset_options": SYNTHETIC, "model": "digits_net",
        "estimators": [{"name": m.estimator, "params": m.params}],
        "bits": [{"w": setting["w_bits"], "a": setting["a_bits"]}], "first_last_float": setting["first_last_float"],
        "include_full_precision": False, "epochs": 1, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01},
    })


@pytest.mark.parametrize("name, setting", SETTINGS,
                         ids=[f"{n}-w{s['w_bits']}a{s['a_bits']}" for n, s in SETTINGS])
def test_every_method_trains_one_epoch_on_synthetic_data(name, setting):
    spec = method_spec(name, setting)
    (trial,) = spec.trials()
    model = build_model(spec, trial, load_dataset("synthetic", seed=0, **SYNTHETIC))
    quantizers = [q for q in model.modules() if isinstance(q, estimators.Estimator)]
    assert quantizers and {q.name for q in quantizers} == {get_method(name).estimator}
    first = next(m for m in model.modules() if isinstance(m, (estimators.QConv2d, estimators.QLinear)))
    assert (first.weight_quantizer is None) == setting["first_last_float"]
    epochs = []
    final = run_trial(spec, trial, on_epoch=lambda m, s: epochs.append(m), threads=1)
    (m,) = epochs
    assert math.isfinite(m["train_loss"]) and 0.0 <= m["test_acc"] <= 1.0
    assert final["final_test_acc"] == m["test_acc"]
    if name == "lq_nets" and setting["w_bits"] > 1:  # QEM refitted the bases: no longer at their initial v2 = 2·v1
        v = m["schedule"]
        assert abs(v["lq_nets.weight.v2"] / v["lq_nets.weight.v1"] - 2) > 1e-3

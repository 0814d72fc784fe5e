"""The spec's ``quantizer``: one grid for every estimator of a spec, in the keys, the trials and training."""
import json

import pytest
import torch
from pydantic import ValidationError

from workers.spec import ExperimentSpec, parse_spec

BASE = {"name": "t", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"]}


def test_without_a_quantizer_nothing_changes():
    s = parse_spec(BASE)
    assert s.quantizer is None and "quantizer" not in json.loads(s.canonical_json())
    assert [t.key for t in s.trials()] == ["float-w32a32-s0", "aqe-w1a1-s0", "ste-w1a1-s0"]
    assert [t.grid for t in s.trials()] == [None, "minw", "minw"]
    assert "quantizer" in ExperimentSpec.ADDED_LATER


def test_quantizer_becomes_each_estimators_grid_and_shows_in_the_label():
    s = parse_spec({**BASE, "estimators": ["aqe", "ste", "dorefa", "pact"], "quantizer": "uniform",
                    "bits": [{"w": 2, "a": 2}]})
    trials = {t.key: t for t in s.trials()}
    assert sorted(trials) == ["aqe[grid=uniform]-w2a2-s0", "dorefa-w2a2-s0", "float-w32a32-s0", "pact-w2a2-s0",
                              "ste[grid=uniform]-w2a2-s0"]
    assert trials["aqe[grid=uniform]-w2a2-s0"].estimator_params == {"grid": "uniform"}
    assert trials["dorefa-w2a2-s0"].estimator_params == {}  # dorefa's own grid: no parameter, its usual label
    assert {k: t.grid for k, t in trials.items()} == {k: None if k.startswith("float") else "uniform" for k in trials}
    assert s.spec_hash() != parse_spec({**BASE, "estimators": ["aqe", "ste", "dorefa", "pact"],
                                        "bits": [{"w": 2, "a": 2}]}).spec_hash()
    assert parse_spec(s.canonical_json()) == s


def test_quantizer_keeps_the_estimators_own_parameters_and_leaves_methods_alone():
    s = parse_spec({**BASE, "estimators": [{"name": "aqe", "params": {"backward": "alg1"}}], "methods": ["twn"],
                    "quantizer": "uniform_signed", "bits": [{"w": 1, "a": 1}]})
    keys = {t.key: t for t in s.trials()}
    assert keys["aqe[backward=alg1,grid=uniform_signed]-w1a1-s0"].estimator_params == {
        "backward": "alg1", "grid": "uniform_signed"}
    twn = keys["twn-w2a32-s0"]
    assert twn.estimator_params == {"scale": "twn"} and twn.grid == "minw"


@pytest.mark.parametrize("patch, reason", [
    ({"estimators": ["aqe", "ewgs", "lsq"], "quantizer": "minw"},
     "estimator 'ewgs' cannot quantize to the 'minw' grid, only to uniform_signed; estimator 'lsq' cannot quantize "
     "to the 'minw' grid, only to learned_step"),
    ({"estimators": ["dorefa"], "quantizer": "uniform_signed"},
     "estimator 'dorefa' cannot quantize to the 'uniform_signed' grid, only to uniform"),
    ({"quantizer": "learned_basis"}, "estimator 'aqe' cannot quantize to the 'learned_basis' grid, only to minw, "
                                     "uniform, uniform_signed"),
])
def test_an_estimator_that_cannot_use_the_grid_is_named_with_its_grids(patch, reason):
    with pytest.raises(ValidationError) as e:
        parse_spec({**BASE, **patch})
    assert [(err["loc"], reason in err["msg"]) for err in e.value.errors()] == [(("quantizer",), True)], e.value


def test_every_estimator_that_can_use_a_grid_is_accepted():
    s = parse_spec({**BASE, "estimators": ["aqe", "ste", "clipped_ste", "approx_sign", "ede", "reste", "xnor", "ewgs",
                                           "dsq"], "quantizer": "uniform_signed", "include_full_precision": False})
    assert {t.grid for t in s.trials()} == {"uniform_signed"}


def test_a_uniform_grid_trains_and_reports_no_packed_form():
    """The real trainer on the grid: levels are DoReFa's, and the MINW packed format (sign / ternary /
    powers of two) has no code for them, so the trial reports no packed form instead of failing."""
    from workers.train import run_trial

    s = parse_spec({**BASE, "estimators": ["aqe"], "quantizer": "uniform", "bits": [{"w": 2, "a": 2}],
                    "include_full_precision": False, "epochs": 1, "dataset_options": {"train_size": 300}})
    (trial,) = s.trials()
    states = []
    final = run_trial(s, trial, on_epoch=lambda m, st: states.append(st), threads=1)
    assert final["packed_bytes"] is None and final["packed_agreement"] is None
    assert 0 < final["final_test_acc"] <= 1
    from workers.datasets import load_dataset
    from workers.train import build_model

    data = load_dataset("digits", train_size=300)
    model = build_model(s, trial, data)
    model.load_state_dict(states[-1]["model"])
    model.eval()
    with torch.no_grad():
        acts = []
        hooks = [m.register_forward_hook(lambda mod, i, o: acts.append((mod.role, o))) for m in model.modules()
                 if getattr(m, "grid", None) == "uniform"]
        model(data.head("test", 20)[0])
        for h in hooks:
            h.remove()
    assert {r for r, _ in acts} == {"weight", "activation"}
    for role, out in acts:  # DoReFa's levels: {−1, −⅓, ⅓, 1} for weights, {0, ⅓, ⅔, 1} for activations
        want = torch.tensor([-1, -1 / 3, 1 / 3, 1] if role == "weight" else [0, 1 / 3, 2 / 3, 1])
        assert torch.isclose(out.reshape(-1, 1), want.reshape(1, -1).to(out.dtype)).any(1).all(), role

"""The experiment spec: defaults, validation messages, grid expansion, stable keys and hashes."""
import json

import pytest
from pydantic import ValidationError

from workers.spec import FLOAT_ESTIMATOR, parse_spec

BASE = {"name": "t", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"]}


def errors(data, **kw):
    with pytest.raises(ValidationError) as e:
        parse_spec(data, **kw)
    return [(".".join(map(str, err["loc"])), err["msg"]) for err in e.value.errors()]


def test_defaults_fill_what_is_left_out():
    s = parse_spec(BASE)
    assert s.bit_cells() == [(1, 1)] and s.seeds == [0] and s.include_full_precision
    assert s.optimizer.name == "adam" and s.lr_schedule.name == "exponential"
    assert s.trial_count() == 3


def test_grid_expansion_order_and_keys():
    s = parse_spec({**BASE, "estimators": ["aqe", {"name": "aqe", "params": {"backward": "alg1"}}],
                    "bits": {"w": [1, 2], "a": [1, 32]}, "seeds": [0, 7]})
    keys = [t.key for t in s.trials()]
    assert len(keys) == s.trial_count() == 2 * (1 + 2 * 4)
    assert keys[:3] == ["float-w32a32-s0", "aqe-w1a1-s0", "aqe-w1a32-s0"]
    assert "aqe[backward=alg1]-w2a32-s7" in keys
    assert len(set(keys)) == len(keys)
    fp = s.trials()[0]
    assert fp.estimator == FLOAT_ESTIMATOR and fp.is_float and (fp.w_bits, fp.a_bits) == (32, 32)


def test_bits_list_of_cells_and_cross_products_mix():
    s = parse_spec({**BASE, "bits": [{"w": 1, "a": 1}, {"w": [2, 3], "a": 2}]})
    assert s.bit_cells() == [(1, 1), (2, 2), (3, 2)]


def test_hash_is_canonical():
    a = parse_spec({**BASE, "seeds": [0]})
    b = parse_spec(json.dumps({"estimators": ["aqe", "ste"], "model": "digits_net", "name": "t", "dataset": "digits"}))
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != parse_spec({**BASE, "epochs": 3}).spec_hash()


@pytest.mark.parametrize(
    "patch,field,reason",
    [
        ({"estimators": ["sgn"]}, "estimators.0", "unknown estimator 'sgn'; known: approx_sign"),
        ({"estimators": [{"name": "aqe", "params": {"bw": 1}}]}, "estimators.0", "has no parameter 'bw'"),
        ({"estimators": []}, "estimators", "at least 1"),
        ({"estimators": ["aqe", "aqe"]}, "estimators", "duplicate estimators"),
        ({"dataset": "imagenet"}, "dataset", "unknown dataset 'imagenet'; known: cifar10"),
        ({"model": "resnet50"}, "model", "unknown model 'resnet50'; known: "),
        ({"bits": {"w": 0, "a": 1}}, "bits", "bit width 0 is not supported"),
        ({"bits": [{"w": 1, "a": 1}, {"w": 1, "a": 1}]}, "bits", "duplicate bit configurations: W1A1"),
        ({"bits": {"w": 32, "a": 32}}, "bits", "use include_full_precision"),
        ({"seeds": [1, 1]}, "seeds", "duplicate seeds"),
        ({"epochs": 0}, "epochs", "greater than or equal to 1"),
        ({"epochs": 1_000_000}, "epochs", "less than or equal to 10000"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"optimizer": {"name": "adam", "lr": -1}}, "optimizer.lr", "greater than 0"),
        ({"resources": {"cpu": 1, "tpu": 1}}, "resources.tpu", "Extra inputs"),
    ],
)
def test_errors_name_the_field_and_the_reason(patch, field, reason):
    errs = errors({**BASE, **patch})
    assert any(loc.startswith(field) and reason in msg for loc, msg in errs), errs


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seed_range_ends_are_accepted(seed):
    assert {t.seed for t in parse_spec({**BASE, "seeds": [seed]}).trials()} == {seed}


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63])
def test_seed_outside_uint32_is_refused(seed):
    assert errors({**BASE, "seeds": [seed]}) == [("seeds", "Value error, seeds must lie in [0, 2^32 − 1]")]


def test_grid_limit_is_configurable(monkeypatch):
    big = {**BASE, "seeds": list(range(10))}  # 30 trials
    assert any("over the limit of 20" in msg for _, msg in errors(big, max_trials_limit=20))
    monkeypatch.setenv("BITBENCH_MAX_TRIALS", "25")
    assert any("30 trials, over the limit of 25" in msg for _, msg in errors(big))

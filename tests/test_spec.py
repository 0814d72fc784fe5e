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
        ({"estimators": []}, "", "list at least one estimator or method"),
        ({"estimators": ["aqe", "aqe"]}, "estimators", "duplicate estimators"),
        ({"dataset": "imagenet21k"}, "dataset", "unknown dataset 'imagenet21k'; known: cifar10"),
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


# -- dataset_options: each data set's own options model, checked when the spec is parsed ----------
SYNTH = {**BASE, "dataset": "synthetic", "model": "convnet_a"}


@pytest.mark.parametrize(
    "spec,field,reason",
    [
        ({**BASE, "dataset_options": {"bogus": 1}}, "dataset_options.bogus", "Extra inputs are not permitted"),
        ({**BASE, "dataset_options": {"data_dir": "/etc"}}, "dataset_options.data_dir", "Extra inputs"),
        ({**BASE, "dataset_options": {"download": True}}, "dataset_options.download", "Extra inputs"),
        ({**BASE, "dataset_options": {"train_size": -5}}, "dataset_options.train_size", "greater than or equal to 1"),
        ({**BASE, "dataset_options": {"train_size": 0}}, "dataset_options.train_size", "greater than or equal to 1"),
        ({**BASE, "dataset_options": {"val_size": -1}}, "dataset_options.val_size", "greater than or equal to 0"),
        ({**BASE, "dataset_options": {"val_size": 1.0}}, "dataset_options.val_size", "less than 1"),
        ({**BASE, "dataset_options": {"val_size": "10"}}, "dataset_options.val_size", "valid integer"),
        ({**BASE, "dataset_options": {"val_size": True}}, "dataset_options.val_size", "valid integer"),
        ({**BASE, "dataset_options": {"split_seed": -1}}, "dataset_options.split_seed", "greater than or equal to 0"),
        ({**BASE, "dataset_options": {"shape": [1, 8, 8]}}, "dataset_options.shape", "Extra inputs"),  # synthetic's
        ({**SYNTH, "dataset_options": {"shape": [3, 32]}}, "dataset_options.shape", "at least 3 items"),
        ({**SYNTH, "dataset_options": {"shape": [3, 0, 32]}}, "dataset_options.shape.1", "greater than 0"),
        ({**SYNTH, "dataset_options": {"num_classes": 1}}, "dataset_options.num_classes", "greater than or equal to 2"),
        ({**SYNTH, "dataset_options": {"n_train": 0}}, "dataset_options.n_train", "greater than or equal to 1"),
        ({**SYNTH, "dataset_options": {"n_val": -1}}, "dataset_options.n_val", "greater than or equal to 0"),
        ({**SYNTH, "dataset_options": {"n_test": 0}}, "dataset_options.n_test", "greater than or equal to 1"),
        ({**SYNTH, "dataset_options": {"separation": -0.1}}, "dataset_options.separation",
         "greater than or equal to 0"),
        ({**SYNTH, "dataset_options": {"shape": [3, 4096, 4096], "n_train": 100}}, "dataset_options",
         "over the limit of 1073741824"),
        ({**SYNTH, "dataset_options": {"n_train": 10, "n_val": 2, "val_size": 12}}, "dataset_options",
         "leaves no training data in a pool of 12"),
        ({**SYNTH, "dataset_options": {"download": True}}, "dataset_options.download", "Extra inputs"),
        ({**BASE, "dataset_options": [1]}, "dataset_options", "should be an object"),
    ],
)
def test_dataset_options_are_checked_against_the_data_sets_own(spec, field, reason):
    errs = errors(json.dumps(spec))  # as the API parses it (which drops union tags from loc: test_bad_input)
    assert any(loc.startswith(field) and reason in msg for loc, msg in errs), errs
    assert errors(spec)  # and from a dict (python mode) too


def test_dataset_options_of_an_unknown_dataset_add_no_errors_of_their_own():
    bad = {**BASE, "dataset": "imagenet21k", "dataset_options": {"bogus": 1}}
    assert [loc for loc, _ in errors(bad)] == ["dataset"]


def test_dataset_options_become_the_data_sets_model_and_keep_only_what_was_given():
    s = parse_spec({**SYNTH, "dataset_options": {"shape": [1, 8, 8], "n_train": 64}})
    opts = s.dataset_options
    assert type(opts).__name__ == "SyntheticOptions"
    assert opts.shape == [1, 8, 8] and opts.n_train == 64 and opts.num_classes == 10 and opts.train_size is None
    assert json.loads(s.canonical_json())["dataset_options"] == {"shape": [1, 8, 8], "n_train": 64}
    assert parse_spec(s.canonical_json()).spec_hash() == s.spec_hash()  # stored, read back, the same
    digits = parse_spec(BASE).dataset_options
    assert type(digits).__name__ == "DatasetOptions" and digits.split_seed == 0 and digits.val_size is None
    assert json.loads(parse_spec(BASE).canonical_json())["dataset_options"] == {}
    assert parse_spec({**BASE, "dataset_options": {"val_size": 0.5}}).dataset_options.val_size == 0.5
    assert parse_spec({**BASE, "dataset_options": {"val_size": 100}}).dataset_options.val_size == 100


@pytest.mark.parametrize("spec,digest", [
    ("studies/fashion_mnist_estimators.json", "09aab7469e287ff3fcf4a1cb844286630d945801a1c3fcd18c003228539f0cdd"),
    ("studies/demo_digits.json", "ffc34cd45d6a0db1f9ca8c2b1286dfb03ce99fde165e59ef84b7e3770270fc36"),
    ({**SYNTH, "name": "s", "estimators": ["aqe"], "dataset_options": {
        "shape": [3, 32, 32], "n_train": 10240, "n_val": 0, "n_test": 1000, "separation": 0.3}},
     "c876c3bc1907027b066ac4aff29113db6facfe6533017eb4005cb3939e0b1863"),
])
def test_spec_hashes_of_existing_specs_are_unchanged(spec, digest):
    """A queued run's Tune experiment is named by its hash: typed options must not change it."""
    from pathlib import Path

    data = (Path(__file__).resolve().parents[1] / spec).read_text() if isinstance(spec, str) else spec
    assert parse_spec(data).spec_hash() == digest


@pytest.mark.parametrize("params, reason", [
    ({"pow2_thresholds": "banana"}, "expected a non-empty list of numbers"),
    ({"pow2_thresholds": [0.1, 0.05, 0.2]}, "strictly increasing fractions"),
    ({"pow2_thresholds": [0.0, 0.5, 0.9]}, "strictly increasing fractions"),
    ({"pow2_thresholds": [0.1, True]}, "expected a non-empty list of numbers"),
])
def test_estimator_params_without_a_numeric_default_are_still_checked(params, reason):
    """A parameter whose default is None is checked by its own rule at POST, not when a worker builds it."""
    errs = errors({**BASE, "estimators": [{"name": "ste", "params": params}]})
    assert any(loc.startswith("estimators.0") and reason in msg for loc, msg in errs), errs


def test_valid_pow2_thresholds_are_accepted_and_kept():
    s = parse_spec({**BASE, "estimators": [{"name": "aqe", "params": {"pow2_thresholds": [0.02, 0.07, 0.14]}}],
                    "bits": [{"w": 3, "a": 3}]})
    assert s.estimators[0].params == {"pow2_thresholds": [0.02, 0.07, 0.14]}

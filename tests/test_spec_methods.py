"""Named methods in the spec: expansion to trials with the method's own cells, labels and policy."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from workers.methods import get_method, list_methods
from workers.spec import parse_spec

BASE = {"name": "t", "dataset": "digits", "model": "digits_net", "seeds": [0, 1]}


def messages(data) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as e:
        parse_spec(data)
    return [(".".join(map(str, err["loc"])), err["msg"]) for err in e.value.errors()]


def test_methods_expand_to_their_own_cells_labels_and_policies():
    spec = parse_spec({**BASE, "estimators": ["aqe"], "methods": ["bnn", "dorefa"], "bits": [{"w": 2, "a": 2}]})
    seed0 = [t for t in spec.trials() if t.seed == 0]
    got = [(t.key, t.estimator, t.estimator_params, t.method, t.first_last_float) for t in seed0]
    assert got == [("float-w32a32-s0", "float", {}, None, None),
                   ("aqe-w2a2-s0", "aqe", {}, None, None),
                   ("bnn-w1a1-s0", "clipped_ste", {}, "bnn", False),
                   ("dorefa-w1a1-s0", "dorefa", {}, "dorefa", True),
                   ("dorefa-w1a2-s0", "dorefa", {}, "dorefa", True),
                   ("dorefa-w8a8-s0", "dorefa", {}, "dorefa", True),
                   ("dorefa-w1a4-s0", "dorefa", {}, "dorefa", True)]
    assert spec.trial_count() == len(spec.trials()) == 2 * 7


def test_a_method_may_keep_some_of_its_cells_and_its_per_cell_policy():
    spec = parse_spec({**BASE, "methods": [{"name": "minw_aqe", "bits": [{"w": 1, "a": [1, 2]}]}, "twn"],
                       "include_full_precision": False, "seeds": [0]})
    assert [(t.key, t.estimator_params, t.first_last_float) for t in spec.trials()] == [
        ("minw_aqe-w1a1-s0", {}, False), ("minw_aqe-w1a2-s0", {}, True), ("twn-w2a32-s0", {"scale": "twn"}, False)]
    assert get_method("minw_aqe").first_last_float is False  # W1A2's True is the cell's own (Table V)


def test_every_registered_method_makes_a_valid_spec():
    spec = parse_spec({**BASE, "methods": list_methods(), "seeds": [0]})
    assert {t.method for t in spec.trials() if t.method} == set(list_methods())


@pytest.mark.parametrize("body, where, reason", [
    ({"methods": ["bogus"]}, "methods.0", "unknown method 'bogus'; known: binaryconnect, bnn"),
    ({"methods": [{"name": "bnn", "bits": [{"w": 2, "a": 2}]}]}, "methods.0", "method 'bnn' has no cell W2A2"),
    ({"methods": ["bnn", "bnn"]}, "methods", "duplicate methods: bnn"),
    ({"methods": [{"name": "bnn", "bits": []}]}, "methods.0", "at least 1 item"),
    ({"estimators": [], "methods": []}, "", "list at least one estimator or method"),
    ({}, "", "list at least one estimator or method"),
    ({"estimators": ["dorefa"], "methods": ["dorefa"]}, "", "share the label 'dorefa'"),
])
def test_bad_methods_name_the_field_and_the_reason(body, where, reason):
    errs = messages({**BASE, **body})
    assert any(loc.startswith(where) and reason in msg for loc, msg in errs), errs


def test_specs_without_methods_keep_their_hash():
    spec = parse_spec({**BASE, "estimators": ["aqe"]})
    assert "methods" not in spec.canonical_json()
    assert parse_spec({**BASE, "estimators": ["aqe"], "methods": []}).spec_hash() == spec.spec_hash()
    with_method = parse_spec({**BASE, "estimators": ["aqe"], "methods": ["bnn"]})
    assert parse_spec(with_method.canonical_json()) == with_method and with_method.spec_hash() != spec.spec_hash()


@pytest.mark.parametrize("path, table", [
    ("studies/paper_table3_cifar_resnet110_densenet100.json", "III"),
    ("studies/paper_table4_imagenet_alexnet_bn.json", "IV"),
    ("studies/paper_table5_imagenet_resnet18.json", "V"),
])
def test_the_paper_table_studies_run_every_cell_the_table_prints(path, table):
    import json
    from pathlib import Path

    data = json.loads((Path(__file__).resolve().parents[1] / path).read_text())
    specs = [parse_spec(d) for d in (data if isinstance(data, list) else [data])]
    ran = {(t.method, t.w_bits, t.a_bits) for s in specs for t in s.trials() if t.method}
    printed = {(name, c.w_bits, c.a_bits) for name in list_methods() for c in get_method(name).cells
               if table in c.tables}
    assert ran == printed
    assert all(s.description and s.include_full_precision for s in specs)

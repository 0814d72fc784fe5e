"""A spec's ``model_options``: ConvNets A–D at reduced width (``width_divisor``), validated per model."""
from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

import estimators
from service import store
from service.app import create_app
from service.config import Settings
from workers.models import create_model, trial_model
from workers.spec import parse_spec

# 1-bit weight bits of A / B / C / D per width divisor (the table in workers/models/convnet.py)
CIFAR = {1: (10_352_000, 4_562_624, 2_591_424, 1_802_432), 2: (2_591_424, 1_143_648, 649_568, 451_680),
         4: (649_568, 287_408, 163_248, 113_456), 8: (163_248, 72_600, 41_240, 28_632)}
FASHION = {1: (10_349_696, 4_561_472, 2_590_272, 1_801_280), 2: (2_590_272, 1_143_072, 648_992, 451_104),
           4: (648_992, 287_120, 162_960, 113_168), 8: (162_960, 72_456, 41_096, 28_488)}


def bits_of(name, shape, divisor):
    return estimators.weight_storage(create_model(name, input_shape=shape, options={"width_divisor": divisor})).bits


@pytest.mark.parametrize("divisor", sorted(CIFAR))
def test_weight_counts_per_divisor(divisor):
    names = ("convnet_a", "convnet_b", "convnet_c", "convnet_d")
    assert tuple(bits_of(n, (3, 32, 32), divisor) for n in names) == CIFAR[divisor]
    assert tuple(bits_of(n, (1, 28, 28), divisor) for n in names) == FASHION[divisor]


def test_divisor_one_is_the_paper_model():
    for name, bits in zip(("convnet_a", "convnet_b", "convnet_c", "convnet_d"), CIFAR[1], strict=True):
        model = create_model(name)
        assert estimators.weight_storage(model).bits == bits
        assert str(model) == str(create_model(name, options={"width_divisor": 1}))


def test_every_width_is_divided():
    model = create_model("convnet_b", options={"width_divisor": 4})
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    fcs = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert convs == [16, 16, 32, 32, 64, 64] and fcs == [256, 256, 10]


def test_a_reduced_convnet_trains_on_fashion_mnist_shapes():
    torch.manual_seed(0)
    spec = parse_spec({"name": "w", "dataset": "fashion_mnist", "model": "convnet_c", "estimators": ["aqe"],
                       "model_options": {"width_divisor": 8}})
    trial = spec.trials()[1]
    model = trial_model(spec, trial, num_classes=10, input_shape=(1, 28, 28))
    assert estimators.weight_storage(model).bits == FASHION[8][2]
    out = model(torch.randn(4, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (4, 10)


def test_options_leave_older_specs_and_their_hash_alone():
    body = {"name": "h", "model": "convnet_d", "dataset": "cifar10", "estimators": ["ste"]}
    plain = parse_spec(body)
    assert "model_options" not in plain.canonical_json()
    reduced = parse_spec({**body, "model_options": {"width_divisor": 2}})
    assert reduced.spec_hash() != plain.spec_hash()
    assert '"model_options":{"width_divisor":2}' in reduced.canonical_json()
    assert parse_spec(reduced.model_dump(mode="json")).spec_hash() == reduced.spec_hash()  # round trip


@pytest.mark.parametrize("model, options, loc, kind", [
    ("convnet_a", {"width_divisor": 3}, ["body", "model_options", "width_divisor"], "value_error"),
    ("convnet_a", {"width_divisor": 0}, ["body", "model_options", "width_divisor"], "greater_than_equal"),
    ("convnet_a", {"width_divisor": 128}, ["body", "model_options", "width_divisor"], "less_than_equal"),
    ("convnet_a", {"width_divisor": "2"}, ["body", "model_options", "width_divisor"], "int_type"),
    ("convnet_a", {"width": 2}, ["body", "model_options", "width"], "extra_forbidden"),
    ("digits_net", {"width_divisor": 2}, ["body", "model_options", "width_divisor"], "extra_forbidden"),
])
def test_bad_model_options_are_a_422_naming_the_field(db_url, model, options, loc, kind):
    body = {"name": "bad", "model": model, "estimators": ["ste"], "model_options": options}
    with TestClient(create_app(Settings(database_url=db_url, api_token=None))) as client:
        r = client.post("/runs", json=body)
        assert r.status_code == 422, r.text
        assert [(e["loc"], e["type"]) for e in r.json()["detail"]] == [(loc, kind)]
        with client.app.state.session_factory() as s:
            assert store.count_rows(s) == {"runs": 0, "trials": 0, "metrics": 0}
        assert client.post("/runs", json={**body, "model_options": {}}).status_code == 202


def test_the_published_schema_names_each_models_options():
    from workers.spec import ExperimentSpec

    schema = ExperimentSpec.model_json_schema()
    cases = {c["if"]["properties"]["model"]["const"]: c["then"]["properties"]["model_options"]["$ref"]
             for c in schema["allOf"] if "model" in c["if"]["properties"]}
    assert cases["convnet_a"].endswith("/ConvNetOptions") and cases["digits_net"].endswith("/ModelOptions")
    assert schema["$defs"]["ConvNetOptions"]["properties"]["width_divisor"]["maximum"] == 64

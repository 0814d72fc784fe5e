"""The published OpenAPI schema of the spec says what POST /runs accepts: registered names as enums, the
allowed bit widths, non-empty lists, each data set's and estimator's own options; the ready specs in
``studies/`` validate against it, and specs it refuses the server refuses too."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

import estimators
from service.app import create_app
from service.config import Settings
from service.demo import DEMO_SPEC
from workers.datasets import list_datasets
from workers.methods import list_methods
from workers.models import list_models
from workers.spec import ALLOWED_BITS

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
VALID = {"name": "schema", "estimators": ["aqe"], "bits": [{"w": 1, "a": 1}], "epochs": 2}


def published(tmp_path: Path) -> tuple[TestClient, dict]:
    client = TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'bb.sqlite'}", api_token=None)))
    return client, client.get("/openapi.json").json()


@pytest.fixture(scope="module")
def app_and_schema(tmp_path_factory):
    client, doc = published(tmp_path_factory.mktemp("openapi"))
    with client:
        yield client, doc


@pytest.fixture(scope="module")
def schemas(app_and_schema) -> dict:
    return app_and_schema[1]["components"]["schemas"]


def spec_validator(doc: dict) -> Draft202012Validator:
    """A JSON Schema 2020-12 validator for the request body of POST /runs, as published."""
    body = doc["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**body, "components": doc["components"]})


def study_specs() -> list:
    out = [pytest.param(DEMO_SPEC, id="demo"),
           pytest.param(json.loads((ROOT / "docs/results/fashion_mnist/spec.json").read_text()), id="fashion-result")]
    for path in sorted((ROOT / "studies").glob("*.json")):
        data = json.loads(path.read_text())
        for i, spec in enumerate(data if isinstance(data, list) else [data]):
            out.append(pytest.param(spec, id=f"{path.stem}-{i}"))
    return out


def test_names_are_enums_of_the_registries(schemas):
    spec = schemas["ExperimentSpec"]["properties"]
    assert spec["dataset"]["enum"] == list_datasets() and spec["dataset"]["default"] == "digits"
    assert spec["model"]["enum"] == list_models()
    [as_string] = [s for s in spec["estimators"]["items"]["anyOf"] if s.get("type") == "string"]
    assert as_string["enum"] == estimators.list_estimators()
    assert schemas["EstimatorChoice"]["properties"]["name"]["enum"] == estimators.list_estimators()
    assert spec["estimators"]["uniqueItems"] is True and spec["methods"]["uniqueItems"] is True
    [as_name] = [s for s in spec["methods"]["items"]["anyOf"] if s.get("type") == "string"]
    assert as_name["enum"] == list_methods()
    # a spec lists estimators, methods or both: at least one of the two lists is non-empty
    assert schemas["ExperimentSpec"]["anyOf"] == [{"required": [f], "properties": {f: {"minItems": 1}}}
                                                  for f in ("estimators", "methods")]


def test_bits_are_the_allowed_widths_in_non_empty_lists(schemas):
    assert list(ALLOWED_BITS) == [1, 2, 3, 4, 5, 6, 7, 8, 32]
    for side in ("w", "a"):
        one, many = schemas["BitsConfig"]["properties"][side]["anyOf"]
        assert one["type"] == "integer" and one["enum"] == list(ALLOWED_BITS)
        assert many["type"] == "array" and many["items"]["enum"] == list(ALLOWED_BITS)
        assert many["minItems"] == 1 and many["uniqueItems"] is True
    cell, cells = schemas["ExperimentSpec"]["properties"]["bits"]["anyOf"]
    assert cell == {"$ref": "#/components/schemas/BitsConfig"}
    assert cells["type"] == "array" and cells["minItems"] == 1 and cells["uniqueItems"] is True


def test_seeds_are_bounded_and_distinct(schemas):
    seeds = schemas["ExperimentSpec"]["properties"]["seeds"]
    assert seeds["items"] == {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
    assert (seeds["minItems"], seeds["maxItems"], seeds["uniqueItems"]) == (1, 1000, True)


def test_dataset_options_are_each_data_sets_own(schemas):
    options = schemas["ExperimentSpec"]["properties"]["dataset_options"]
    refs = {o["$ref"].rsplit("/", 1)[1] for o in options["anyOf"]}
    assert refs == {"DatasetOptions", "ImagenetOptions", "SyntheticOptions"}
    for name in refs:
        model = schemas[name]
        assert model["additionalProperties"] is False
        assert not {"data_dir", "download"} & set(model["properties"])
    assert schemas["DatasetOptions"]["properties"]["train_size"]["anyOf"][0] == {"type": "integer", "minimum": 1}
    assert schemas["SyntheticOptions"]["properties"]["shape"]["minItems"] == 3


@pytest.mark.parametrize("spec", study_specs())
def test_ready_specs_validate_against_the_published_schema(app_and_schema, spec):
    errors = [e.message for e in spec_validator(app_and_schema[1]).iter_errors(spec)]
    assert errors == []


def synth(**options) -> dict:
    return {**VALID, "dataset": "synthetic", "model": "convnet_a", "dataset_options": options}


REFUSED = {  # each refused by the published schema and by the server
    "estimator-unknown": {**VALID, "estimators": ["nope"]},
    "estimator-object-unknown": {**VALID, "estimators": [{"name": "nope"}]},
    "estimators-empty": {**VALID, "estimators": []},
    "estimators-repeated": {**VALID, "estimators": ["aqe", "aqe"]},
    "estimator-param-unknown": {**VALID, "estimators": [{"name": "aqe", "params": {"bogus": 1}}]},
    "estimator-param-choice": {**VALID, "estimators": [{"name": "aqe", "params": {"backward": "eq99"}}]},
    "estimator-param-range": {**VALID, "estimators": [{"name": "dsq", "params": {"alpha_init": 5}}]},
    "estimator-param-type": {**VALID, "estimators": [{"name": "pact", "params": {"alpha_init": "big"}}]},
    "estimator-param-of-another": {**VALID, "estimators": [{"name": "ste", "params": {"backward": "eq18"}}]},
    "bits-empty-list": {**VALID, "bits": []},
    "bits-empty-w": {**VALID, "bits": {"w": [], "a": 1}},
    "bits-9": {**VALID, "bits": [{"w": 9, "a": 1}]},
    "bits-0-in-list": {**VALID, "bits": {"w": [0, 1], "a": 1}},
    "bits-repeated-width": {**VALID, "bits": {"w": [1, 1], "a": 1}},
    "seeds-empty": {**VALID, "seeds": []},
    "seeds-negative": {**VALID, "seeds": [-1]},
    "seeds-2^32": {**VALID, "seeds": [2**32]},
    "seeds-repeated": {**VALID, "seeds": [3, 3]},
    "dataset-unknown": {**VALID, "dataset": "imagenet21k"},
    "model-unknown": {**VALID, "model": "resnet50"},
    "option-unknown": {**VALID, "dataset_options": {"bogus": 1}},
    "option-download": {**VALID, "dataset_options": {"download": True}},
    "option-data-dir": {**VALID, "dataset_options": {"data_dir": "/etc"}},
    "option-train-size": {**VALID, "dataset_options": {"train_size": -5}},
    "option-val-size-fraction": {**VALID, "dataset_options": {"val_size": 1.5}},
    "option-of-synthetic-on-digits": {**VALID, "dataset_options": {"shape": [1, 8, 8]}},
    "synthetic-shape-2d": synth(shape=[3, 32]),
    "synthetic-one-class": synth(num_classes=1),
    "synthetic-download": synth(download=True),
    "unknown-field": {**VALID, "learning_rate": 0.1},
}
ACCEPTED = {
    "defaults": VALID,
    "everything-listed": {**VALID, "estimators": ["aqe", {"name": "aqe", "params": {"backward": "alg1"}},
                                                  {"name": "dsq", "params": {"alpha_init": 0.5}}],
                          "bits": {"w": [1, 2, 32], "a": [1, 8]}, "seeds": [0, 2**32 - 1]},
    "split-options": {**VALID, "dataset_options": {"val_size": 0.25, "train_size": 100, "split_seed": 3}},
    "synthetic-options": synth(shape=[1, 8, 8], num_classes=3, n_train=30, n_val=0, n_test=9, separation=0.5),
}


@pytest.mark.parametrize("body", REFUSED.values(), ids=REFUSED.keys())
def test_what_the_schema_refuses_the_server_refuses(app_and_schema, body):
    client, doc = app_and_schema
    assert not spec_validator(doc).is_valid(body)
    r = client.post("/runs", json=body)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("body", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_what_the_schema_accepts_the_server_accepts(app_and_schema, body):
    client, doc = app_and_schema
    assert [e.message for e in spec_validator(doc).iter_errors(body)] == []
    assert client.post("/runs", json=body).status_code == 202


def test_an_estimator_registered_after_import_is_published(tmp_path, monkeypatch):
    """The enums are read from the registries when the schema is made, not when modules load."""
    from estimators.base import ESTIMATORS

    monkeypatch.setitem(ESTIMATORS._items, "late_sign", estimators.get_estimator_class("ste"))
    client, doc = published(tmp_path)
    with client:
        assert "late_sign" in doc["components"]["schemas"]["EstimatorChoice"]["properties"]["name"]["enum"]
        assert spec_validator(doc).is_valid({**VALID, "estimators": ["late_sign"]})

"""The spec's JSON schema beyond what pydantic derives from the types: what the validators check.

The validators of :mod:`workers.spec` check registered names, bit widths, seeds and options with
messages that list what exists; these annotations make the published schema (``/openapi.json``,
``/docs``, generated clients) say the same. Registries are read when a schema is made, not at
import, so names registered later are listed too.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import estimators

from .data.registry import list_datasets, options_model


class Keywords:
    """Annotation metadata: JSON-schema keywords added to a type's schema; a callable value is
    called when the schema is made (``Annotated[str, Keywords(enum=list_models)]``)."""

    def __init__(self, **keywords: Any):
        self.keywords = keywords

    def __get_pydantic_json_schema__(self, core_schema, handler) -> dict:
        schema = handler(core_schema)
        schema.update({k: v() if callable(v) else v for k, v in self.keywords.items()})
        return schema


def when(field: str, cases: dict[str, dict], target: str, default: str | None = None) -> list[dict]:
    """``allOf`` items: where ``field`` is ``value`` (or absent, for its ``default``), ``target``
    must match ``cases[value]``."""
    return [{"if": {"properties": {field: {"const": value}}, **({} if value == default else {"required": [field]})},
             "then": {"properties": {target: schema}}} for value, schema in cases.items()]


def param_schema(param: dict) -> dict:
    """One catalogue parameter as :meth:`estimators.Param.check` takes it: one of its choices, or
    a number within its bounds (for a numeric default), or anything."""
    schema: dict[str, Any] = {"description": param["doc"], "default": param["default"]}
    default = param["default"]
    if param["choices"]:
        schema["enum"] = param["choices"]
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        schema["type"] = "number"
        schema.update({k: param[b] for k, b in (("minimum", "low"), ("maximum", "high")) if param[b] is not None})
    return schema


def estimator_params(schema: dict) -> None:
    """``EstimatorChoice``'s extra schema: each registered estimator's own ``params``, by ``name``."""
    cases = {e["name"]: {"type": "object", "properties": {k: param_schema(p) for k, p in e["params"].items()},
                         "additionalProperties": False}
             for e in estimators.estimator_catalog()}
    schema["allOf"] = when("name", cases, "params")


def dataset_options(schema: dict, resolve: Callable[[dict], dict]) -> None:
    """``ExperimentSpec``'s extra schema: each data set's own options model, by ``dataset``.
    ``resolve`` turns a ``$ref`` of the ``dataset_options`` union into its model's schema."""
    refs = {resolve(ref)["title"]: ref for ref in schema["properties"]["dataset_options"]["anyOf"]}
    cases = {name: refs[options_model(name).__name__] for name in list_datasets()}
    schema["allOf"] = when("dataset", cases, "dataset_options", schema["properties"]["dataset"]["default"])


def model_options(schema: dict, resolve: Callable[[dict], dict]) -> None:
    """``ExperimentSpec``'s extra schema: each model's own options model, by ``model`` (added to ``allOf``)."""
    from .models import list_models  # on first use, as the spec's names
    from .models import options_model as model_options_model

    refs = {resolve(ref)["title"]: ref for ref in schema["properties"]["model_options"]["anyOf"]}
    cases = {name: refs[model_options_model(name).__name__] for name in list_models()}
    schema["allOf"] = [*schema.get("allOf", []),
                       *when("model", cases, "model_options", schema["properties"]["model"]["default"])]

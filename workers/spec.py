"""The experiment spec (POST /runs and ``python -m workers.sweep``): schema, defaults, grid.

One JSON object describes a sweep: estimators × (weight bits, activation bits) × seeds on one
dataset and model, plus an optional full-precision reference per seed. Unknown fields are
rejected; names are checked against the registries, ``dataset_options`` against the data set's
options model; :meth:`ExperimentSpec.trials` expands the grid into :class:`TrialSpec` cells with
stable keys. The JSON schema says what the validators check (:mod:`workers.spec_schema`).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FieldSerializationInfo,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

import estimators

from . import spec_schema
from .data.base import MAX_SEED, DatasetOptions
from .data.registry import list_datasets, options_model, options_models
from .model_options import ModelOptions
from .model_options import options_models as model_options_models
from .records import FLOAT_LABEL, estimator_label, trial_key
from .spec_schema import Keywords

FLOAT = estimators.FLOAT_BITS
ALLOWED_BITS = (*estimators.SUPPORTED_BITS, FLOAT)
FLOAT_ESTIMATOR = FLOAT_LABEL  # the estimator (name and label) of full-precision reference trials
DEFAULT_MAX_TRIALS = 2000


def max_trials() -> int:
    """The grid-size limit: ``BITBENCH_MAX_TRIALS`` or 2,000."""
    return int(os.environ.get("BITBENCH_MAX_TRIALS", DEFAULT_MAX_TRIALS))


def _repeated(labels: list) -> list:
    """The labels that occur more than once, sorted (linear: a long list in a POST costs no more)."""
    return sorted(x for x, n in Counter(labels).items() if n > 1)


class _Strict(BaseModel):
    """Unknown fields are refused, and values are not coerced: ``"3"``, ``3.0`` or ``true`` is no
    integer, ``1`` no boolean (what the published JSON schema says is what the server takes)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Bits = Annotated[int, Field(description="1–8, or 32 for float"), Keywords(enum=list(ALLOWED_BITS))]
BitsList = Annotated[list[Bits], Keywords(minItems=1, uniqueItems=True)]
EstimatorName = Annotated[str, Keywords(enum=estimators.list_estimators)]
GridName = Annotated[str, Keywords(enum=estimators.list_grids)]
Seed = Annotated[int, Keywords(minimum=0, maximum=MAX_SEED)]  # checked, with one message, by _unique_seeds


def _model_names() -> list[str]:
    from .models import list_models  # on first use: the model zoo is not needed to read a spec

    return list_models()


def _model_options(name: str) -> type[ModelOptions]:
    from .models import options_model as model_options_model

    return model_options_model(name)


def _method_names() -> list[str]:
    from .methods import list_methods

    return list_methods()


MethodName = Annotated[str, Keywords(enum=_method_names)]


def _check_bits(v: int) -> int:
    if v not in ALLOWED_BITS:
        raise ValueError(f"bit width {v} is not supported; allowed: 1–8 and {FLOAT} (float)")
    return v


class BitsConfig(_Strict):
    """One (weights, activations) cell, or lists of each for their cross product."""

    w: Bits | BitsList
    a: Bits | BitsList

    @field_validator("w", "a")
    @classmethod
    def _valid(cls, v):
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise ValueError("must not be empty")
        for b in vals:
            _check_bits(b)
        if len(set(vals)) != len(vals):
            raise ValueError(f"repeats a bit width: {vals}")
        return v

    def cells(self) -> list[tuple[int, int]]:
        ws = self.w if isinstance(self.w, list) else [self.w]
        as_ = self.a if isinstance(self.a, list) else [self.a]
        return [(w, a) for w in ws for a in as_]


class EstimatorChoice(_Strict):
    """A registered estimator name with parameters (defaults fill the rest)."""

    model_config = ConfigDict(json_schema_extra=spec_schema.estimator_params)

    name: EstimatorName
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _registered(self):
        estimators.validate_estimator_params(self.name, self.params)  # raises with the known names
        return self

    @property
    def label(self) -> str:
        """``name`` or ``name[k=v,…]`` (user-given parameters, sorted): part of the trial key."""
        return estimator_label(self.name, self.params)


class MethodChoice(_Strict):
    """A named published method (:mod:`workers.methods`): its estimator, parameters, bit cells and
    first/last-layer policy. ``bits`` keeps a subset of the method's cells (default: all of them)."""

    name: MethodName
    bits: Annotated[list[BitsConfig], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _registered(self):
        from .methods import get_method

        own = get_method(self.name).bit_cells()  # raises with the known names
        asked = [c for b in self.bits or [] for c in b.cells()]
        missing = [f"W{w}A{a}" for w, a in asked if (w, a) not in own]
        if missing:
            raise ValueError(f"method {self.name!r} has no cell {', '.join(missing)}; its cells: "
                             f"{', '.join(f'W{w}A{a}' for w, a in own)}")
        return self

    def settings(self) -> list[tuple[int, int, bool]]:
        """``(w_bits, a_bits, first_last_float)`` of each chosen cell, in the method's order."""
        from .methods import get_method

        method = get_method(self.name)
        asked = {c for b in self.bits or [] for c in b.cells()}
        chosen = {}
        for cell in method.cells:
            if (not asked or (cell.w_bits, cell.a_bits) in asked) and (cell.w_bits, cell.a_bits) not in chosen:
                chosen[(cell.w_bits, cell.a_bits)] = method.policy(cell)
        return [(w, a, policy) for (w, a), policy in chosen.items()]


class Optimizer(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(0.01, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    nesterov: bool = Field(False, description="SGD only")


class LRSchedule(_Strict):
    name: Literal["constant", "exponential", "cosine", "step"] = "exponential"
    gamma: float = Field(0.98, gt=0, le=1, description="exponential: per epoch; step: at each milestone")
    milestones: list[int] = Field(default_factory=list, description="step: epochs at which lr *= gamma")
    eta_min: float = Field(0.0, ge=0, description="cosine: final lr")


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0, le=256)
    gpu: float = Field(0.0, ge=0, le=16, description="fractional: 0.25 lets four trials share a GPU")
    cpu_fallback: bool = Field(False, description="with gpu > 0: train on the CPU when the worker sees no CUDA "
                               "device (default: the trial fails and says so)")


# every data set's (model's) options model: the published schema lists them, an error's loc names the option
AnyDatasetOptions = Union[tuple(options_models())]  # noqa: UP007 (built at run time)
AnyModelOptions = Union[tuple(model_options_models())]  # noqa: UP007 (built at run time)


class TrialSpec(_Strict):
    """One grid cell: an estimator at (w_bits, a_bits) with one seed; a named method's trial
    also carries the method and its first/last-layer policy (None: the spec's)."""

    key: str
    estimator: str
    estimator_params: dict[str, Any] = Field(default_factory=dict)
    w_bits: int
    a_bits: int
    seed: int
    method: str | None = None
    first_last_float: bool | None = None

    @property
    def is_float(self) -> bool:
        return self.estimator == FLOAT_ESTIMATOR

    @property
    def label(self) -> str:
        """The estimator label (the key's first part): the method's name, else the estimator's label."""
        return self.method or estimator_label(self.estimator, self.estimator_params)

    @property
    def grid(self) -> str | None:
        """The quantizer grid the trial's estimator quantizes to (``estimators.grids``); None for float."""
        if self.is_float:
            return None
        return estimators.get_estimator_class(self.estimator).grid_for(self.estimator_params)


class ExperimentSpec(_Strict):
    """A sweep: (estimators × bits + named methods at their own cells) × seeds on one dataset and
    model (DESIGN.md §3)."""

    name: str = Field(..., min_length=1, max_length=200)
    description: str = Field("", max_length=4000, description="free text: where the recipe comes from, what "
                             "the paper left open and what was chosen")
    dataset: Annotated[str, Keywords(enum=list_datasets)] = "digits"
    model: Annotated[str, Keywords(enum=_model_names)] = "digits_net"
    estimators: Annotated[list[EstimatorName | EstimatorChoice], Keywords(uniqueItems=True)] = Field(
        default_factory=list, description="gradient estimators, each trained at every cell of `bits`")
    methods: Annotated[list[MethodName | MethodChoice], Keywords(uniqueItems=True)] = Field(
        default_factory=list, description="named published methods (GET /catalog), each at its own bit cells "
                                          "and with its own first/last-layer policy")
    quantizer: GridName | None = Field(
        None, description="one quantizer grid for every estimator of `estimators` (GET /catalog lists the grids "
        "each can use: minw = sign / ternary / powers of two, uniform = DoReFa's levels, uniform_signed = EWGS's), "
        "so that they are ranked on the same levels; an estimator that cannot use it is refused. Named methods "
        "keep their own. Absent: each estimator's own grid")
    bits: BitsConfig | Annotated[list[BitsConfig], Keywords(minItems=1, uniqueItems=True)] = Field(
        default_factory=lambda: [BitsConfig(w=1, a=1)])
    include_full_precision: bool = True
    seeds: Annotated[list[Seed], Keywords(uniqueItems=True)] = Field(default_factory=lambda: [0], min_length=1,
                                                                     max_length=1000)
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    lr_schedule: LRSchedule = Field(default_factory=LRSchedule)
    resources: Resources = Field(default_factory=Resources)
    first_last_float: bool = Field(False, description="keep the first and last layers float (estimators; "
                                   "methods carry their own policy)")
    bn_reestimate: bool = Field(False, description="after the last epoch, recompute every BatchNorm's running "
                                "statistics over the training set with the final weights (no weight update) "
                                "before the final evaluation")
    dataset_options: AnyDatasetOptions = Field(
        default_factory=dict, validate_default=True,
        description="the data set's own options: val_size, train_size, split_seed; synthetic also shape, sizes")
    max_retries: int = Field(2, ge=0, le=10, description="retries of a failed trial (Ray Tune FailureConfig)")
    model_options: AnyModelOptions = Field(
        default_factory=dict, validate_default=True,
        description="the model's own options: convnet_a … convnet_d take width_divisor (divide every conv and FC "
                    "width by 1, 2, 4, …, 64); other models none")

    @field_validator("dataset")
    @classmethod
    def _dataset_known(cls, v):
        if v not in list_datasets():
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(list_datasets())}")
        return v

    @field_validator("dataset_options", mode="before")
    @classmethod
    def _options_of_the_dataset(cls, v, info: ValidationInfo):
        """Validate with the options model of ``dataset``, so that an error's loc names the option."""
        name = info.data.get("dataset")
        if name is None:  # the data set is unknown, and its error says so: no verdict on its options
            return DatasetOptions.model_construct()
        if isinstance(v, DatasetOptions):
            v = v.model_dump(exclude_unset=True)
        # strict, as the rest of the spec (Python callers of load_dataset may pass a tuple for a list)
        return options_model(name).model_validate(v, strict=True) if isinstance(v, dict) else v  # else: not an object

    @field_serializer("dataset_options")
    def _given_options(self, v: DatasetOptions, info: FieldSerializationInfo) -> dict[str, Any]:
        """Only the options given (defaults stay out of the canonical JSON, so of the spec hash)."""
        return v.model_dump(mode=info.mode, exclude_unset=True)

    @field_validator("model_options", mode="before")
    @classmethod
    def _options_of_the_model(cls, v, info: ValidationInfo):
        """Validate with the options model of ``model``, so that an error's loc names the option."""
        name = info.data.get("model")
        if name is None:  # the model is unknown, and its error says so
            return ModelOptions.model_construct()
        if isinstance(v, ModelOptions):
            v = v.model_dump(exclude_unset=True)
        return _model_options(name).model_validate(v, strict=True) if isinstance(v, dict) else v

    @field_serializer("model_options")
    def _given_model_options(self, v: ModelOptions, info: FieldSerializationInfo) -> dict[str, Any]:
        """Only the options given (an empty object, left out of the canonical JSON, while none are)."""
        return v.model_dump(mode=info.mode, exclude_unset=True)

    @field_validator("model")
    @classmethod
    def _model_known(cls, v):
        if v not in _model_names():
            raise ValueError(f"unknown model {v!r}; known: {', '.join(_model_names())}")
        return v

    @field_validator("estimators", "methods", mode="before")
    @classmethod
    def _names_as_choices(cls, v):
        """A bare name stands for ``{"name": name}``."""
        if isinstance(v, list):
            return [{"name": e} if isinstance(e, str) else e for e in v]
        return v

    @field_validator("quantizer")
    @classmethod
    def _every_estimator_can_use_it(cls, v, info: ValidationInfo):
        if v is None:
            return v
        if v not in estimators.list_grids():
            raise ValueError(f"unknown quantizer grid {v!r}; known: {', '.join(estimators.list_grids())}")
        chosen = info.data.get("estimators") or []
        cannot = {e.name: estimators.get_estimator_class(e.name).grids for e in chosen
                  if v not in estimators.get_estimator_class(e.name).grids}
        if cannot:
            raise ValueError("; ".join(f"estimator {name!r} cannot quantize to the {v!r} grid, only to "
                                       f"{', '.join(grids)}" for name, grids in cannot.items()))
        if own := [e.label for e in chosen if "grid" in e.params]:
            raise ValueError(f"{', '.join(own)} set their own grid: choose the grid per estimator or for every "
                             "estimator with quantizer, not both")
        return v

    @field_validator("methods")
    @classmethod
    def _unique_methods(cls, v):
        if dupes := _repeated([m.name for m in v]):
            raise ValueError(f"duplicate methods: {', '.join(dupes)} (list each once; 'bits' chooses its cells)")
        return v

    @field_validator("estimators")
    @classmethod
    def _unique_estimators(cls, v):
        if dupes := _repeated([e.label for e in v]):
            raise ValueError(f"duplicate estimators (same name and parameters): {', '.join(dupes)}")
        return v

    @field_validator("bits", mode="after")
    @classmethod
    def _unique_cells(cls, v):
        cells = [c for b in (v if isinstance(v, list) else [v]) for c in b.cells()]
        if not cells:
            raise ValueError("must not be empty")
        if dupes := _repeated(cells):
            raise ValueError(f"duplicate bit configurations: {', '.join(f'W{w}A{a}' for w, a in dupes)}")
        if (FLOAT, FLOAT) in cells:
            raise ValueError("W32A32 is the full-precision reference: use include_full_precision instead")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v):
        if dupes := _repeated(v):
            raise ValueError(f"duplicate seeds: {dupes}")
        if any(s < 0 or s > MAX_SEED for s in v):
            raise ValueError("seeds must lie in [0, 2^32 − 1]")
        return v

    @model_validator(mode="after")
    def _something_to_train(self):
        if not self.estimators and not self.methods:
            raise ValueError("list at least one estimator or method")
        cells = set(self.bit_cells())
        dupes = sorted({m.name for m in self.methods for e in self.estimator_choices() if e.label == m.name
                        and cells & {(w, a) for w, a, _ in m.settings()}})
        if dupes:
            raise ValueError(f"an estimator and a method share the label {', '.join(map(repr, dupes))} at the same "
                             "bits: their trials would have the same keys; run them in separate specs")
        return self

    @model_validator(mode="after")
    def _grid_size(self, info: ValidationInfo):
        limit = (info.context or {}).get("max_trials", max_trials()) if info else max_trials()
        n = self.trial_count()
        if n > limit:
            raise ValueError(f"the grid has {n} trials, over the limit of {limit} (BITBENCH_MAX_TRIALS)")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        schema = handler(core_schema)
        resolved = handler.resolve_ref_schema(schema)
        spec_schema.dataset_options(resolved, handler.resolve_ref_schema)
        spec_schema.model_options(resolved, handler.resolve_ref_schema)
        resolved["anyOf"] = [{"required": [f], "properties": {f: {"minItems": 1}}} for f in ("estimators", "methods")]
        return schema

    # -- grid -------------------------------------------------------------------------------
    def estimator_choices(self) -> list[EstimatorChoice]:
        """``estimators`` as trained: the spec's ``quantizer`` becomes the ``grid`` parameter of each
        estimator whose own grid it is not (so it shows in the label: ``aqe[grid=uniform]``)."""
        out = []
        for e in self.estimators:
            if self.quantizer is None or self.quantizer == estimators.get_estimator_class(e.name).grids[0]:
                out.append(e)
            else:
                out.append(EstimatorChoice(name=e.name, params={**e.params, "grid": self.quantizer}))
        return out

    def bit_cells(self) -> list[tuple[int, int]]:
        return [c for b in (self.bits if isinstance(self.bits, list) else [self.bits]) for c in b.cells()]

    def trial_count(self) -> int:
        per_seed = len(self.estimators) * len(self.bit_cells()) + sum(len(m.settings()) for m in self.methods)
        return len(self.seeds) * (per_seed + int(self.include_full_precision))

    def trials(self) -> list[TrialSpec]:
        """The grid, in a stable order: per seed, the float reference, estimator × bits, then each
        method at its cells (keyed and labelled by the method's name)."""
        from .methods import get_method

        out = []
        for seed in self.seeds:
            if self.include_full_precision:
                out.append(TrialSpec(key=trial_key(FLOAT_ESTIMATOR, FLOAT, FLOAT, seed), estimator=FLOAT_ESTIMATOR,
                                     w_bits=FLOAT, a_bits=FLOAT, seed=seed))
            for est in self.estimator_choices():
                for w, a in self.bit_cells():
                    out.append(TrialSpec(key=trial_key(est.label, w, a, seed), estimator=est.name,
                                         estimator_params=dict(est.params), w_bits=w, a_bits=a, seed=seed))
            for choice in self.methods:
                method = get_method(choice.name)
                for w, a, policy in choice.settings():
                    out.append(TrialSpec(key=trial_key(method.name, w, a, seed), estimator=method.estimator,
                                         estimator_params=dict(method.params), w_bits=w, a_bits=a, seed=seed,
                                         method=method.name, first_last_float=policy))
        return out

    #: fields added after specs were first stored (``a.b``: field b of section a): left out of the canonical
    #: JSON while they hold their default, so the hash (and the Tune experiment named by it) of an older spec
    #: never changes
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("bn_reestimate", "methods", "description", "resources.cpu_fallback",
                                                  "model_options", "quantizer")

    def protocol_view(self) -> dict[str, Any]:
        """The stored spec (``model_dump(mode="json")``) with only the data set's and model's options that differ
        from their defaults (``{"split_seed": <default>}`` trains what ``{}`` trains): what
        :func:`workers.protocol.protocol` reads. The spec's hash keeps the options as given."""
        data = self.model_dump(mode="json")
        data["dataset_options"] = self.dataset_options.model_dump(mode="json", exclude_defaults=True)
        data["model_options"] = self.model_options.model_dump(mode="json", exclude_defaults=True)
        return data

    def canonical_json(self) -> str:
        """The normalised spec as canonical JSON (sorted keys, defaults filled but those of
        :attr:`ADDED_LATER`)."""
        data = self.model_dump(mode="json")
        for name in self.ADDED_LATER:
            *sections, leaf = name.split(".")
            holder, model = data, type(self)
            for section in sections:
                holder, model = holder[section], model.model_fields[section].annotation
            if holder[leaf] == model.model_fields[leaf].get_default(call_default_factory=True):
                del holder[leaf]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()


def parse_spec(data: dict[str, Any] | str, *, max_trials_limit: int | None = None) -> ExperimentSpec:
    """Validate a spec from a dict or a JSON string (raises pydantic.ValidationError)."""
    ctx = {"max_trials": max_trials_limit} if max_trials_limit is not None else None
    if isinstance(data, str):
        return ExperimentSpec.model_validate_json(data, context=ctx)
    return ExperimentSpec.model_validate(data, context=ctx)

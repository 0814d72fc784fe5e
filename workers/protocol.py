"""A trial's protocol: the canonical identity of everything that changes what it measures, except the
axes a study compares (estimator and its parameters, bits, seed) and what does not change a number
(name, description, resources, retries).

The protocol is the data set with its options, the model with its options (``model_options``, a key
only when some are given, so that the ids of specs without them never changed), ``first_last_float``,
epochs, batch size, optimizer, learning-rate schedule, ``bn_reestimate`` and :data:`PROTOCOL_VERSION`; its id is the
first 16 hex digits of the SHA-256 of its canonical JSON. Only the parameters a setting uses are
part of it (Adam ignores ``momentum``; a constant schedule ignores ``gamma``), so two specs that
train identically share their protocol. The leaderboard compares trials of one protocol only.

A protocol belongs to a trial, not to a run: a named method carries its own first/last-layer
policy, so one run may train trials under two protocols (``first_last_float`` true and false).

Plain Python on the spec as stored (``ExperimentSpec.model_dump(mode="json")``: ``runs.spec``), no
torch and no spec parsing, so that a migration computes the protocol of stored runs.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

#: the version of the quantizer and model definitions. Bump it with any change of an estimator's,
#: quantizer's or model's forward behaviour (what a trained network computes, or how it trains under
#: the same recipe): trials trained before and after then have different protocols and are never
#: ranked together. Refactors that leave every number unchanged keep it.
PROTOCOL_VERSION = 2
#: what each version changed: 2, the MINW activation quantizers' default ``act_stats`` per_sample → running
#: length of a protocol id (hex digits of the SHA-256)
PROTOCOL_ID_LENGTH = 16
PROTOCOL_ID_PATTERN = f"^[0-9a-f]{{{PROTOCOL_ID_LENGTH}}}$"

#: the optimizer parameters each optimizer uses, the schedule parameters each schedule uses (workers/train.py)
_OPTIMIZER_PARAMS = {"adam": ("lr", "weight_decay"), "adamw": ("lr", "weight_decay"),
                     "sgd": ("lr", "weight_decay", "momentum", "nesterov")}
_SCHEDULE_PARAMS = {"constant": (), "exponential": ("gamma",), "cosine": ("eta_min",), "step": ("gamma", "milestones")}
#: data set options that change how fast data load, not what a trial measures
_UNMEASURED_OPTIONS = ("workers",)
#: the spec's defaults of the fields read here (a spec stored before a field existed lacks it)
_DEFAULTS = {"dataset": "digits", "model": "digits_net", "epochs": 10, "batch_size": 128, "first_last_float": False,
             "bn_reestimate": False}


class Protocol(NamedTuple):
    """A protocol's id (16 hex digits), its short readable label and its canonical definition."""

    id: str
    label: str
    definition: dict[str, Any]


def _used(settings: Mapping[str, Any] | None, params: Mapping[str, tuple[str, ...]], default: str) -> dict[str, Any]:
    settings = dict(settings or {})
    name = settings.get("name", default)
    out = {"name": name}
    for key in params.get(name, tuple(k for k in settings if k != "name")):
        if key in settings:
            value = settings[key]
            out[key] = sorted(value) if isinstance(value, list) else value
    if name == "sgd" and not out.get("momentum"):
        out["nesterov"] = False  # Nesterov without momentum is plain SGD (build_optimizer)
    return out


def definition(spec: Mapping[str, Any], *, first_last_float: bool | None = None,
               version: int = PROTOCOL_VERSION) -> dict[str, Any]:
    """The canonical protocol of a stored spec's trials (``first_last_float``: a method trial's own
    policy; None: the spec's)."""
    def get(key: str) -> Any:
        return spec.get(key, _DEFAULTS[key])

    options = {k: v for k, v in (spec.get("dataset_options") or {}).items()
               if v is not None and k not in _UNMEASURED_OPTIONS}
    defn = {"dataset": get("dataset"), "dataset_options": options, "model": get("model"),
            "first_last_float": bool(get("first_last_float") if first_last_float is None else first_last_float),
            "epochs": get("epochs"), "batch_size": get("batch_size"),
            "optimizer": _used(spec.get("optimizer"), _OPTIMIZER_PARAMS, "adam"),
            "lr_schedule": _used(spec.get("lr_schedule"), _SCHEDULE_PARAMS, "exponential"),
            "bn_reestimate": bool(get("bn_reestimate")), "version": version}
    model_options = {k: v for k, v in (spec.get("model_options") or {}).items() if v is not None}
    if model_options:
        defn["model_options"] = model_options
    return defn


def protocol_id(defn: Mapping[str, Any]) -> str:
    """The first :data:`PROTOCOL_ID_LENGTH` hex digits of the SHA-256 of the canonical JSON."""
    text = json.dumps(defn, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:PROTOCOL_ID_LENGTH]


def _count(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


def label(defn: Mapping[str, Any]) -> str:
    """``fashion_mnist/fashion_net · 10 ep · adam 0.01 cosine · bs 128 · 20k train``: what differs from
    the defaults is named (weight decay, momentum, options, first/last float, BN re-estimation, version)."""
    opt, sched = defn["optimizer"], defn["lr_schedule"]
    optimizer = f"{opt['name']} {opt.get('lr', '')}".strip()
    if opt.get("weight_decay"):
        optimizer += f" wd {opt['weight_decay']}"
    if opt["name"] == "sgd":
        optimizer += f" m {opt.get('momentum')}" + (" nesterov" if opt.get("nesterov") else "")
    schedule = {"constant": "constant", "exponential": f"exp {sched.get('gamma')}",
                "cosine": "cosine" + (f" to {sched.get('eta_min')}" if sched.get("eta_min") else ""),
                "step": f"step {sched.get('gamma')} at {sched.get('milestones')}"}.get(sched["name"], sched["name"])
    model = defn["model"] + "".join(f" {k} {v}" for k, v in sorted(defn.get("model_options", {}).items()))
    parts = [f"{defn['dataset']}/{model}", f"{defn['epochs']} ep", f"{optimizer} {schedule}",
             f"bs {defn['batch_size']}"]
    options = dict(defn["dataset_options"])
    if "train_size" in options:
        parts.append(f"{_count(options.pop('train_size'))} train")
    parts += [f"{k} {v}" for k, v in sorted(options.items())]
    if defn["first_last_float"]:
        parts.append("first/last float")
    if defn["bn_reestimate"]:
        parts.append("BN re-estimated")
    if defn["version"] != PROTOCOL_VERSION:
        parts.append(f"v{defn['version']}")
    return " · ".join(parts)


def protocol(spec: Mapping[str, Any], *, first_last_float: bool | None = None,
             version: int = PROTOCOL_VERSION) -> Protocol:
    """The :class:`Protocol` of a stored spec's trials (see :func:`definition`)."""
    defn = definition(spec, first_last_float=first_last_float, version=version)
    return Protocol(protocol_id(defn), label(defn), defn)

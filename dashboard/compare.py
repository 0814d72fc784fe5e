"""Pure pieces of the compare page: which runs were asked for, how their recipes differ, and their
leaderboards merged into one side-by-side table.

A run's *recipe* is the part of its spec that decides what one trial of a grid cell trains and
measures (:data:`RECIPE_FIELDS`, as ``workers.spec.ExperimentSpec`` stores them); the grid itself
(estimators, bits, seeds) is what a comparison lines up, not a difference.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from workers.records import bit_config, config_sort_key

MIN_RUNS, MAX_RUNS = 2, 8
#: top-level spec fields of the recipe, in the order the differences are listed; nested objects
#: (dataset_options, optimizer, lr_schedule) are compared field by field as ``optimizer.lr`` etc.
RECIPE_FIELDS = ("dataset", "dataset_options", "model", "epochs", "batch_size", "optimizer", "lr_schedule",
                 "first_last_float", "bn_reestimate")


class BadSelection(ValueError):
    """The compare page's ``run`` parameters do not name 2–8 distinct run ids (the message says why)."""


def parse_selection(values: Iterable[str]) -> list[int]:
    """The distinct run ids of ``?run=…&run=…`` in the order given; :class:`BadSelection` unless
    every value is a positive integer and there are ``MIN_RUNS``–``MAX_RUNS`` distinct ones."""
    ids: list[int] = []
    for value in values:
        text = str(value).strip()
        if not text.isascii() or not text.isdigit() or int(text) < 1:
            raise BadSelection(f"run must be a positive integer run id, not {value!r}.")
        if int(text) not in ids:
            ids.append(int(text))
    if not MIN_RUNS <= len(ids) <= MAX_RUNS:
        raise BadSelection(f"Pick between {MIN_RUNS} and {MAX_RUNS} different runs to compare "
                           f"(run=ID, repeated); {len(ids)} given.")
    return ids


def flatten(value: object, prefix: str) -> dict[str, object]:
    """A spec value as ``{dotted field: leaf value}``: objects are walked key by key (sorted),
    anything else (lists included) is one leaf."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key in sorted(value):
            out.update(flatten(value[key], f"{prefix}.{key}"))
        return out
    return {prefix: value}


def recipe(spec: dict | None) -> dict[str, object]:
    """The flat recipe of a stored spec (fields it lacks are absent)."""
    spec = spec or {}
    out: dict[str, object] = {}
    for field in RECIPE_FIELDS:
        if field in spec:
            out.update(flatten(spec[field], field))
    return out


def recipe_differences(specs: Sequence[dict | None]) -> list[tuple[str, list[object]]]:
    """``[(field, [value in each spec])]`` for every recipe field whose values are not all equal
    (a field one spec lacks is ``None`` there), in :data:`RECIPE_FIELDS` order, nested fields sorted."""
    recipes = [recipe(s) for s in specs]
    order = {f: i for i, f in enumerate(RECIPE_FIELDS)}
    fields = sorted({k for r in recipes for k in r}, key=lambda k: (order[k.split(".")[0]], k))
    out = []
    for field in fields:
        values = [r.get(field) for r in recipes]
        if any(_canonical(v) != _canonical(values[0]) for v in values[1:]):
            out.append((field, values))
    return out


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def recipe_value(value: object) -> str:
    """A recipe value as text: strings as they are, ``—`` for absent, anything else as JSON."""
    if value is None:
        return "—"
    return value if isinstance(value, str) else _canonical(value)


def side_by_side(boards: Sequence[list[dict]]) -> list[dict]:
    """The runs' leaderboards (:func:`service.store.leaderboard` rows of one run each) merged:
    one entry per (w_bits, a_bits, estimator label) any run has, ordered by bit configuration
    (float last) then label, with ``cells``: that run's row or None, one per board."""
    keyed: dict[tuple, list[dict | None]] = {}
    for i, board in enumerate(boards):
        for row in board:
            key = (*bit_config(row["w_bits"], row["a_bits"]), row["estimator_label"])
            keyed.setdefault(key, [None] * len(boards))[i] = row
    order = sorted(keyed, key=lambda k: (*config_sort_key((k[0], k[1])), k[2]))
    return [{"w_bits": w, "a_bits": a, "estimator_label": label, "cells": keyed[(w, a, label)]}
            for w, a, label in order]

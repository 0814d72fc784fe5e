"""The default demo sweep that ``make run`` queues (also ``studies/demo_digits.json``).

Five estimators at W1A1, W1A2, W2A2 and W3A3 plus the float reference, three seeds, on the
embedded digits data set: 63 small trials, a few minutes on two CPU cores.
"""
from __future__ import annotations

from typing import Any

from workers.spec import ExperimentSpec, parse_spec

DEMO_SPEC: dict[str, Any] = {
    "name": "demo: estimators on digits",
    "dataset": "digits",
    "model": "digits_net",
    "estimators": ["aqe", "ste", "clipped_ste", "dorefa", "approx_sign"],
    "bits": [{"w": 1, "a": 1}, {"w": 1, "a": 2}, {"w": 2, "a": 2}, {"w": 3, "a": 3}],
    "include_full_precision": True,
    "seeds": [0, 1, 2],
    "epochs": 5,
    "batch_size": 128,
    "optimizer": {"name": "adam", "lr": 0.01},
    "lr_schedule": {"name": "exponential", "gamma": 0.9},
    "resources": {"cpu": 1, "gpu": 0},
}


def demo_spec() -> ExperimentSpec:
    """The demo as a validated spec (63 trials)."""
    return parse_spec(DEMO_SPEC)

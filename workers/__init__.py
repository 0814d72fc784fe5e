"""bitbench.workers: data sets, models, training one grid cell, and Ray Tune sweeps.

    >>> import workers
    >>> workers.list_datasets(), workers.list_models()
    >>> workers.run_sweep(spec, sink)          # imports Ray on first use

Names resolve lazily so that ``import workers`` stays cheap (Ray and torchvision load on use).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "list_datasets": "workers.datasets", "load_dataset": "workers.datasets", "DataSplits": "workers.datasets",
    "list_models": "workers.models", "create_model": "workers.models",
    "ExperimentSpec": "workers.spec", "TrialSpec": "workers.spec", "parse_spec": "workers.spec",
    "run_trial": "workers.train",
    "run_sweep": "workers.sweep",
    "ResultSink": "workers.sinks", "MemorySink": "workers.sinks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workers' has no attribute {name!r}")

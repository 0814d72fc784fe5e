"""The dashboard's data source: store reads, each in a fresh session (see ``dashboard.router``).

The dashboard takes any integer from its URLs; an id outside the tables' range (``MAX_ID``) names
no record here, and an offset past it is one past every row, so neither reaches the database.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import sessionmaker

from service import store
from service.tables import MAX_ID


class StoreSource:
    """What ``dashboard.create_router(source)`` reads through; returns the store's plain records."""

    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def _read(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        with self._sessions() as s:
            return fn(s, *args, **kwargs)

    def list_runs(self, **filters) -> tuple[list[dict], int]:
        """``(runs, total)``; filters as :func:`service.store.list_runs`."""
        if filters.get("offset", 0) > MAX_ID:
            filters["offset"] = MAX_ID  # the same empty page
        return self._read(store.list_runs, **filters)

    def get_run(self, run_id: int) -> dict | None:
        return self._read(store.get_run, run_id) if 1 <= run_id <= MAX_ID else None

    def list_trials(self, run_id: int, limit: int | None = None, offset: int = 0) -> list[dict]:
        """The run's trials in grid order, one page of them with ``limit``."""
        return self._read(store.list_trials, run_id, limit=limit, offset=min(offset, MAX_ID))

    def get_trial(self, trial_id: int) -> dict | None:
        return self._read(store.get_trial, trial_id) if 1 <= trial_id <= MAX_ID else None

    def leaderboard(self, dataset: str | None = None, model: str | None = None, protocol: str | None = None,
                    metric: str = store.DEFAULT_RANK_METRIC) -> list[dict]:
        return self._read(store.leaderboard, dataset=dataset, model=model, protocol=protocol, metric=metric)

    def protocols(self, dataset: str | None = None, model: str | None = None) -> list[tuple[str, str]]:
        """``(protocol, label)`` pairs with finished results of the dataset and model (the page's choices)."""
        return self._read(store.protocols, dataset=dataset, model=model)

    def run_leaderboard(self, run_id: int, metric: str = store.DEFAULT_RANK_METRIC) -> list[dict]:
        """One run's own leaderboard (the compare page's)."""
        return self._read(store.leaderboard, run_id=run_id, metric=metric)

    def run_results(self, run_id: int) -> list[dict]:
        return self._read(store.run_results, run_id)

    def datasets_models(self) -> list[tuple[str, str]]:
        """Distinct (dataset, model) pairs that have finished results (the leaderboard's groups)."""
        return self._read(store.datasets_models)

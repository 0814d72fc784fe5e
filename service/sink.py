"""``SqlSink``: the ``workers.sinks.ResultSink`` that writes a run's trials and epochs to SQL.

Every call opens a short-lived session and commits before it returns, so a finished epoch is
durable before the next one is reported; ``on_epoch`` stores each (trial, epoch) once however
often it is called. Safe to share between threads, and picklable (it pickles the database URL
and rebuilds its engine lazily) so a Ray Tune callback holding it can be saved with the
experiment.
"""
from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import sessionmaker

from . import store
from .db import make_engine, session_factory

log = logging.getLogger(__name__)


class SqlSink:
    """Results of run ``run_id`` into the database behind ``sessions`` (a session factory)."""

    def __init__(self, sessions: sessionmaker, run_id: int):
        self._sessions = sessions
        self._url = sessions.kw["bind"].url.render_as_string(hide_password=False)
        self.run_id = run_id
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, run_id: int) -> "SqlSink":
        return cls(session_factory(make_engine(url)), run_id)

    def __getstate__(self):
        return {"url": self._url, "run_id": self.run_id}

    def __setstate__(self, state):
        self._url, self.run_id = state["url"], state["run_id"]
        self._sessions, self._ids, self._lock = None, {}, threading.Lock()

    def _session(self):
        with self._lock:
            if self._sessions is None:
                self._sessions = session_factory(make_engine(self._url))
            return self._sessions()

    def _trial_id(self, trial_key: str) -> int:
        with self._lock:
            tid = self._ids.get(trial_key)
        if tid is None:
            with self._session() as s:
                ids = store.trial_ids(s, self.run_id)
            with self._lock:
                self._ids.update(ids)
            if trial_key not in ids:
                raise KeyError(f"run {self.run_id} has no trial {trial_key!r}")
            tid = ids[trial_key]
        return tid

    # -- ResultSink ---------------------------------------------------------------------------
    def on_trial_start(self, trial_key: str, info: dict) -> None:
        """Running on ``info["device"]``; one more attempt."""
        tid = self._trial_id(trial_key)
        with self._session() as s:
            store.record_trial_start(s, tid, device=(info or {}).get("device"))

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        """The attempt's provenance replaces the trial's (its device too)."""
        tid = self._trial_id(trial_key)
        with self._session() as s:
            store.record_provenance(s, tid, provenance)

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        """One metrics row per (trial, epoch), committed before returning; repeats are ignored."""
        tid = self._trial_id(trial_key)
        with self._session() as s:
            store.record_epoch(s, tid, metrics)

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        """Final status (done | failed | cancelled), final metrics and error. The error's full text
        (a traceback) goes to the log; the database keeps its reason (``store.record_trial_end``)."""
        tid = self._trial_id(trial_key)
        if error:
            log.log(logging.WARNING if status == "failed" else logging.INFO, "run %s: trial %s %s:\n%s",
                    self.run_id, trial_key, status, error)
        with self._session() as s:
            store.record_trial_end(s, tid, status, final, error)

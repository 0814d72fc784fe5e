"""``SqlSink``: the ``workers.sinks.ResultSink`` that writes a run's trials and epochs to SQL.

Every call opens a short-lived session and commits before it returns, so a finished epoch is
durable before the next one is reported; ``on_epoch`` stores each (trial, epoch) once however
often it is called. Safe to share between threads, and picklable: the pickle holds the run id and
the database URL *without its password*, and the copy builds its engine on first use, taking the
password from the database URL of the process it runs in (``DATABASE_URL``, the service's setting),
which must name the same database. Every event is logged (``service.sink``) with the run id, the
trial key and the trial id; no URL with a password is logged.
"""
from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import sessionmaker

from . import store
from .db import make_engine, session_factory

log = logging.getLogger(__name__)


def _database_of(url: URL) -> tuple:
    """What names a database in ``url``: backend, user, host, port, database (not the driver or password)."""
    return url.get_backend_name(), url.username, url.host, url.port, url.database


def with_password_from_environment(url: URL) -> URL:
    """``url`` with the password of this process's database URL (``DATABASE_URL``), which must name the
    same database; raises ``RuntimeError`` (the URL shown without a password) when it does not."""
    from .config import get_settings

    own = make_url(get_settings().database_url)
    if _database_of(own) != _database_of(url) or own.password is None:
        raise RuntimeError(f"the database password is not pickled with a SqlSink: this process needs DATABASE_URL "
                           f"with the password of {url.render_as_string(hide_password=True)}")
    return url.set(password=own.password)


class SqlSink:
    """Results of run ``run_id`` into the database behind ``sessions`` (a session factory)."""

    def __init__(self, sessions: sessionmaker, run_id: int):
        self._sessions = sessions
        url = sessions.kw["bind"].url
        self._url, self._has_password = url._replace(password=None), url.password is not None
        self.run_id = run_id
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str | URL, run_id: int) -> SqlSink:
        return cls(session_factory(make_engine(url)), run_id)

    def __getstate__(self):
        return {"url": self._url.render_as_string(hide_password=False), "password": self._has_password,
                "run_id": self.run_id}

    def __setstate__(self, state):
        self._url, self._has_password, self.run_id = make_url(state["url"]), state["password"], state["run_id"]
        self._sessions, self._ids, self._lock = None, {}, threading.Lock()

    def __repr__(self) -> str:
        return f"SqlSink(run {self.run_id}, {self._url.render_as_string(hide_password=True)})"

    def _session(self):
        with self._lock:
            if self._sessions is None:
                url = with_password_from_environment(self._url) if self._has_password else self._url
                self._sessions = session_factory(make_engine(url))
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
        info = info or {}
        with self._session() as s:
            store.record_trial_start(s, tid, device=info.get("device"))
        log.info("run %s: trial %s (id %s) starts, attempt %s", self.run_id, trial_key, tid, info.get("attempt"))

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        """The attempt's provenance replaces the trial's (its device too)."""
        tid = self._trial_id(trial_key)
        with self._session() as s:
            store.record_provenance(s, tid, provenance)
        log.info("run %s: trial %s (id %s) trains on %s of host %s (Ray node %s, GPU ids %s)", self.run_id, trial_key,
                 tid, provenance.get("device"), provenance.get("host"), provenance.get("ray_node_ip"),
                 provenance.get("ray_gpu_ids"))

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        """One metrics row per (trial, epoch), committed before returning; repeats are ignored."""
        tid = self._trial_id(trial_key)
        with self._session() as s:
            stored = store.record_epoch(s, tid, metrics)
        log.debug("run %s: trial %s (id %s) epoch %s %s", self.run_id, trial_key, tid, metrics.get("epoch"),
                  "stored" if stored else "was stored already")

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        """Final status (done | failed | cancelled), final metrics and error. The error's full text
        (a traceback) goes to the log; the database keeps its reason (``store.record_trial_end``)."""
        tid = self._trial_id(trial_key)
        level = logging.WARNING if status == "failed" else logging.INFO
        if error:
            log.log(level, "run %s: trial %s (id %s) %s:\n%s", self.run_id, trial_key, tid, status, error)
        else:
            log.log(level, "run %s: trial %s (id %s) %s", self.run_id, trial_key, tid, status)
        with self._session() as s:
            store.record_trial_end(s, tid, status, final, error)

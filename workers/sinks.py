"""Where a sweep's results go: the ``ResultSink`` protocol and two implementations.

The Tune callback in the driver (``workers.tune_callback``) is the only caller. ``service``
provides ``SqlSink``; ``MemorySink`` serves tests and notebooks, ``JsonlSink`` the CLI.
Every sink must accept a repeated ``on_epoch`` for the same (trial_key, epoch) without
recording it twice (a crashed driver may re-deliver the epochs after its last snapshot).
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

STATUSES = ("done", "failed", "cancelled")


@runtime_checkable
class ResultSink(Protocol):
    """Receives one sweep's events, in the driver, in order per trial."""

    def on_trial_start(self, trial_key: str, info: dict) -> None:
        """A trial (re)starts; ``info`` = {"device": "cpu" | "cuda:0", "attempt": 1, 2, …}."""

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        """Where and with what the trial's current attempt trains (``workers.provenance``): with the attempt's
        first report, before that report's epoch (an attempt that fails before it reports has none)."""

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        """One epoch's metrics (CONTRACTS.md); idempotent per (trial_key, metrics["epoch"])."""

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        """status ∈ done | failed | cancelled; ``final`` when done, ``error`` text when failed."""


class MemorySink:
    """Keeps every event in memory (thread-safe).

    ``epochs[key][epoch]`` holds metrics; a repeated (key, epoch) is ignored and appended to
    ``duplicates`` (or raises ``ValueError`` when ``strict``), so tests can assert exactly-once.
    ``starts[key]`` lists start infos, ``provenance[key]`` the attempts' provenance records,
    ``ends[key]`` holds the latest (status, final, error) and ``events`` the order of starts,
    epochs and ends as (kind, key, attempt-epoch-or-status).
    """

    def __init__(self, strict: bool = False):
        self.strict = strict
        self._lock = threading.Lock()
        self.starts: dict[str, list[dict]] = {}
        self.provenance: dict[str, list[dict]] = {}
        self.epochs: dict[str, dict[int, dict]] = {}
        self.ends: dict[str, tuple[str, dict | None, str | None]] = {}
        self.duplicates: list[tuple[str, int]] = []
        self.events: list[tuple[str, str, object]] = []

    def on_trial_start(self, trial_key: str, info: dict) -> None:
        with self._lock:
            self.starts.setdefault(trial_key, []).append(dict(info))
            self.events.append(("start", trial_key, info.get("attempt")))

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        with self._lock:
            self.provenance.setdefault(trial_key, []).append(dict(provenance))

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        epoch = int(metrics["epoch"])
        with self._lock:
            seen = self.epochs.setdefault(trial_key, {})
            if epoch in seen:
                self.duplicates.append((trial_key, epoch))
                if self.strict:
                    raise ValueError(f"epoch {epoch} of trial {trial_key!r} delivered twice")
                return
            seen[epoch] = dict(metrics)
            self.events.append(("epoch", trial_key, epoch))

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown trial status {status!r}; known: {', '.join(STATUSES)}")
        with self._lock:
            self.ends[trial_key] = (status, final, error)
            self.events.append(("end", trial_key, status))

    def status(self, trial_key: str) -> str | None:
        end = self.ends.get(trial_key)
        return end[0] if end else None


class JsonlSink:
    """Appends one JSON object per event to ``path`` ({"event": "start"|"epoch"|"end", "trial": key, …}),
    flushed per line. Epochs already in the file (an earlier, interrupted run) are not written again."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: set[tuple[str, int]] = set()
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line) if line.strip() else {}
                if rec.get("event") == "epoch":
                    self._seen.add((rec["trial"], int(rec["metrics"]["epoch"])))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def on_trial_start(self, trial_key: str, info: dict) -> None:
        with self._lock:
            self._write({"event": "start", "trial": trial_key, **info})

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        with self._lock:
            self._write({"event": "provenance", "trial": trial_key, "provenance": provenance})

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        with self._lock:
            k = (trial_key, int(metrics["epoch"]))
            if k not in self._seen:
                self._seen.add(k)
                self._write({"event": "epoch", "trial": trial_key, "metrics": metrics})

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        with self._lock:
            self._write({"event": "end", "trial": trial_key, "status": status, "final": final, "error": error})

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TeeSink:
    """Forwards every event to each of ``sinks`` in order (e.g. a file and a progress display)."""

    def __init__(self, *sinks: ResultSink):
        self.sinks = sinks

    def on_trial_start(self, trial_key: str, info: dict) -> None:
        for s in self.sinks:
            s.on_trial_start(trial_key, info)

    def on_provenance(self, trial_key: str, provenance: dict) -> None:
        for s in self.sinks:
            s.on_provenance(trial_key, provenance)

    def on_epoch(self, trial_key: str, metrics: dict) -> None:
        for s in self.sinks:
            s.on_epoch(trial_key, metrics)

    def on_trial_end(self, trial_key: str, status: str, final: dict | None, error: str | None) -> None:
        for s in self.sinks:
            s.on_trial_end(trial_key, status, final, error)

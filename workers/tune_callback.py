"""Ray Tune glue that lives in the driver: results to the sink, cancellation to Tune.

Tune pickles its callbacks into the experiment directory (``tuner.pkl``) and, on
``Tuner.restore``, uses the *unpickled* copies. So :class:`SinkCallback` holds nothing but a
token (the experiment name); the live sink, the stop flag and the bookkeeping sit in a
:class:`SweepBinding` that ``run_sweep`` registers under that token for the duration of
``fit()`` (:func:`bound`). The bookkeeping is also the callback's Tune state
(``get_state``/``set_state``), saved with every experiment snapshot and loaded on restore, so a
restored sweep knows which epochs and trials it already delivered.

Cancellation raises :class:`SweepStopped` out of the tuning loop right after a snapshot, like a
driver that dies, instead of using a ``Stopper``: a stopper marks trials TERMINATED, which
``Tuner.restore`` treats as finished, so a run stopped for a dispatcher restart could never
resume. Stopped this way, unfinished trials stay RUNNING/PENDING in the snapshot and resume
from their checkpoints when the sweep is run again.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ray import tune
from ray.tune.experiment import Trial

from .records import METRIC_KEYS
from .sinks import ResultSink

FINAL_KEY = "final"  # the trainable's last report: {"final": {...}} (no epoch metrics)
PROVENANCE_KEY = "provenance"  # in an attempt's first report: workers.provenance's record as JSON text
EARLIER_EPOCHS_KEY = "earlier_epochs"  # in a report of several epochs: all but the last, as JSON text
ERROR_CHARS = 8000


def epochs_report(batch: list[dict]) -> dict:
    """One report of the epochs ``batch`` (metrics dicts, in order): the last epoch's metrics at the top level
    (Tune's own columns and loggers see them as before), the earlier ones as a JSON list under
    :data:`EARLIER_EPOCHS_KEY` (one text column for Tune's CSV and TensorBoard loggers, which would flatten
    or histogram a list); a batch of one is just its metrics."""
    *earlier, last = batch
    return {**last, EARLIER_EPOCHS_KEY: json.dumps(earlier)} if earlier else dict(last)


def reported_epochs(result: dict) -> list[dict]:
    """The epochs' metrics a report carries, in order (the inverse of :func:`epochs_report`; Tune's own keys
    stay in the last one)."""
    return [*json.loads(result.get(EARLIER_EPOCHS_KEY, "[]")), result]


class SweepStopped(Exception):
    """Raised out of ``Tuner.fit()`` once ``stop_requested()`` returns True."""


@dataclass
class SweepBinding:
    """The live side of one sweep: its sink, its stop flag and what was delivered.

    ``delivered[key]``: highest epoch handed to the sink; ``ended[key]``: done | failed |
    cancelled; ``attempts[key]``: starts so far; ``finals[key]``: the final record awaiting
    ``on_trial_complete``. ``suppressed`` counts re-reported epochs that were not forwarded.
    ``trial_keys`` lists the experiment's trials once ``fit()`` has ended.
    """

    sink: ResultSink
    stop_requested: Callable[[], bool] = lambda: False
    device: str = "cpu"
    poll_s: float = 0.5
    delivered: dict[str, int] = field(default_factory=dict)
    ended: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    finals: dict[str, dict] = field(default_factory=dict)
    cancelled: bool = False
    suppressed: int = 0
    trial_keys: list[str] = field(default_factory=list)  # the experiment's trials, set when it ends
    sink_error: BaseException | None = None  # what the sink raised (Tune re-raises it as a TuneError)
    stop_grace_s: float = 30.0
    _last_poll: float = float("-inf")
    _snapshot: dict | None = None  # what the latest experiment snapshot recorded as delivered / ended
    _stop_since: float | None = None

    def cancel_requested(self) -> bool:
        """Poll ``stop_requested`` at most every ``poll_s`` seconds; latch once True."""
        now = time.monotonic()
        if not self.cancelled and now - self._last_poll >= self.poll_s:
            self._last_poll = now
            self.cancelled = bool(self.stop_requested())
        return self.cancelled

    def ready_to_stop(self) -> bool:
        """Whether the latest experiment snapshot holds everything delivered and ended so far (a
        restore will repeat nothing), or ``stop_grace_s`` have passed since the stop was asked."""
        now = time.monotonic()
        self._stop_since = self._stop_since or now
        return self._snapshot == self._progress() or now - self._stop_since > self.stop_grace_s

    def _progress(self) -> dict:
        return {"delivered": dict(self.delivered), "ended": dict(self.ended)}

    def deliver(self, event: str, *args) -> None:
        """Call ``sink.<event>(*args)``; remember an exception before it propagates."""
        try:
            getattr(self.sink, event)(*args)
        except BaseException as e:
            self.sink_error = e
            raise

    def end(self, key: str, status: str, final: dict | None = None, error: str | None = None) -> None:
        self.deliver("on_trial_end", key, status, final, error)
        self.ended[key] = status
        self.finals.pop(key, None)

    def state(self) -> dict:
        """The bookkeeping, for an experiment snapshot (remembered: see :meth:`ready_to_stop`)."""
        self._snapshot = self._progress()
        return {**self._progress(), "attempts": dict(self.attempts), "finals": dict(self.finals)}

    def load_state(self, state: dict) -> None:
        for name in ("delivered", "ended", "attempts", "finals"):
            getattr(self, name).update(state.get(name, {}))


_BINDINGS: dict[str, SweepBinding] = {}
_LOCK = threading.Lock()


@contextmanager
def bound(token: str, binding: SweepBinding) -> Iterator[SweepBinding]:
    """Register ``binding`` under ``token`` while inside (one live sweep per token)."""
    with _LOCK:
        if token in _BINDINGS:
            raise RuntimeError(f"a sweep named {token!r} is already running in this process")
        _BINDINGS[token] = binding
    try:
        yield binding
    finally:
        with _LOCK:
            _BINDINGS.pop(token, None)


def binding_for(token: str) -> SweepBinding:
    try:
        return _BINDINGS[token]
    except KeyError:
        raise RuntimeError(f"no live sweep {token!r}: Tune callbacks only work inside run_sweep") from None


def trial_key(trial: Trial) -> str:
    return trial.config["trial"]["key"]


def error_text(trial: Trial) -> str:
    """The trial's latest failure as text (Tune's error file, last failure only, truncated)."""
    text = None
    if trial.error_file:
        try:
            with open(trial.error_file, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            text = None
    if text is None:
        text = trial.get_error() or "trial failed (no error text recorded)"
    last = text.rfind("Failure #")
    text = text[last:] if last >= 0 else text
    return text[-ERROR_CHARS:].strip()


class SinkCallback(tune.Callback):
    """Forwards Tune events to the bound sweep's sink, each epoch exactly once per trial, and each
    attempt's provenance (which comes with its first report) before that report's epochs.

    A report may carry several epochs (:func:`reported_epochs`); they are forwarded in order. A trial
    re-reporting from an older checkpoint (a retry, a restore) repeats no epoch: only epochs above the
    highest one delivered are forwarded.
    """

    def __init__(self, token: str):
        self.token = token

    @property
    def binding(self) -> SweepBinding:
        return binding_for(self.token)

    def on_trial_start(self, iteration, trials, trial, **info):
        b, key = self.binding, trial_key(trial)
        b.attempts[key] = b.attempts.get(key, 0) + 1
        b.ended.pop(key, None)  # an errored trial resumed on restore runs again
        b.deliver("on_trial_start", key, {"device": b.device, "attempt": b.attempts[key]})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        b, key = self.binding, trial_key(trial)
        if PROVENANCE_KEY in result:
            b.deliver("on_provenance", key, json.loads(result[PROVENANCE_KEY]))
        if FINAL_KEY in result:
            b.finals[key] = dict(result[FINAL_KEY])
            return
        for metrics in reported_epochs(result):
            epoch = int(metrics["epoch"])
            if epoch <= b.delivered.get(key, 0):
                b.suppressed += 1
                continue
            b.deliver("on_epoch", key, {k: metrics[k] for k in METRIC_KEYS})
            b.delivered[key] = epoch

    def on_trial_complete(self, iteration, trials, trial, **info):
        b, key = self.binding, trial_key(trial)
        final = b.finals.get(key)
        if final is None:
            b.end(key, "failed", None, "the trial ended without reporting its final metrics")
        else:
            b.end(key, "done", final)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.binding.end(trial_key(trial), "failed", None, error_text(trial))

    def on_step_end(self, iteration, trials, **info):
        # Runs after the step's (possibly forced) experiment snapshot. Leaving once that snapshot
        # holds every delivered epoch keeps unfinished trials resumable without repeats.
        b = self.binding
        if b.cancel_requested() and b.ready_to_stop():
            raise SweepStopped("stop requested")

    def on_experiment_end(self, trials, **info):
        self.binding.trial_keys = [trial_key(t) for t in trials]

    def get_state(self) -> dict | None:
        return self.binding.state()

    def set_state(self, state: dict) -> None:
        self.binding.load_state(state)


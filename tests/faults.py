"""Test-only trial hooks (``workers.sweep.TrialHooks``): trace every attempt and inject faults.

``run_sweep(..., hooks=FaultHooks(dir))`` runs them inside each trial's Ray worker (they are pickled
there; the workers import this module from the repository root, which Ray puts on their path). Each
attempt appends "start <resumed epoch>" and "trained <epoch>" lines to ``<dir>/<trial key>.log``; a
file ``<dir>/<trial key>.fail@<epoch>`` (:meth:`FaultHooks.fail`) makes that trial raise once in that
epoch, before reporting it (the file is consumed, so the retry passes). :func:`kill_driver_after_checkpoint`
kills the driver at one point of Tune's loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FaultHooks:
    dir: Path

    def __post_init__(self):
        self.dir.mkdir(parents=True, exist_ok=True)

    # -- in the test ----------------------------------------------------------------------------
    def fail(self, key: str, epoch: int) -> None:
        """Make trial ``key`` raise once in ``epoch``."""
        (self.dir / f"{key}.fail@{epoch}").touch()

    def log(self, key: str) -> list[str]:
        """The trace of trial ``key`` so far."""
        path = self.dir / f"{key}.log"
        return path.read_text().splitlines() if path.exists() else []

    # -- in the trial's worker (TrialHooks) -----------------------------------------------------
    def started(self, trial_key: str, epoch: int) -> None:
        self._trace(trial_key, f"start {epoch}")

    def trained(self, trial_key: str, epoch: int) -> None:
        self._trace(trial_key, f"trained {epoch}")
        try:
            (self.dir / f"{trial_key}.fail@{epoch}").unlink()
        except FileNotFoundError:
            return
        raise RuntimeError(f"injected fault in epoch {epoch} of {trial_key}")

    def _trace(self, key: str, line: str) -> None:
        with open(self.dir / f"{key}.log", "a") as f:
            f.write(line + "\n")


# -- in the driver ------------------------------------------------------------------------------
class DriverKilled(Exception):
    """Raised by :func:`kill_driver_after_checkpoint`: the driver dies there, as under SIGKILL."""


def kill_driver_after_checkpoint(monkeypatch, key: str, epoch: int) -> None:
    """Make the sweep's driver die once, right after Tune registers trial ``key``'s checkpoint of ``epoch``.

    That is the window of issue 15: registering a checkpoint deletes the trial's previous one (``num_to_keep``),
    and the experiment snapshot that names the new one is written only at the end of Tune's step. Raising from
    the callback's ``on_trial_save`` (called after the registration, before the snapshot) leaves Tune's loop
    without a final snapshot (``tune.run`` only cleans up on an exception), as a killed dispatcher would.
    """
    from workers.tune_callback import SinkCallback, trial_key

    armed = [True]

    def on_trial_save(self, iteration, trials, trial, **info):
        if armed[0] and trial_key(trial) == key and trial.last_result.get("epoch") == epoch:
            armed[0] = False
            raise DriverKilled(f"driver killed after the checkpoint of epoch {epoch} of {key}")

    monkeypatch.setattr(SinkCallback, "on_trial_save", on_trial_save, raising=False)

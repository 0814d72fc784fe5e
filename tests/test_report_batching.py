"""Batched reports of short epochs (issue 16): when a trial reports (``workers.sweep.EpochBatcher``), what a
report of several epochs looks like (``workers.tune_callback.epochs_report``), the driver's callback delivering
each of its epochs once, and real sweeps on a local Ray Tune counting their reports in Tune's own files."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from ray.tune.experiment import Trial

from tests.faults import FaultHooks
from tests.test_sweep import CrashingSink
from workers.sinks import MemorySink
from workers.spec import parse_spec
from workers.sweep import REPORT_EVERY_S, EpochBatcher, resolve_report_every_s, run_sweep
from workers.train import METRIC_KEYS
from workers.tune_callback import EARLIER_EPOCHS_KEY, SinkCallback, SweepBinding, bound, epochs_report, reported_epochs

TIMING_KEYS = {"epoch_seconds", "images_per_s"}  # the only metrics that differ between two runs of a trial on the CPU


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batches(every_s: float, epoch_s: list[float]) -> list[list[int]]:
    """The epochs of each report of a trial whose epochs take ``epoch_s`` seconds."""
    clock = FakeClock()
    batcher = EpochBatcher(every_s, len(epoch_s), clock)
    out = []
    for epoch, seconds in enumerate(epoch_s, start=1):
        clock.now += seconds
        if batch := batcher.add({"epoch": epoch}):
            out.append([m["epoch"] for m in batch])
    return out


# -- when a trial reports ----------------------------------------------------------------------
def test_short_epochs_wait_until_the_interval_has_passed_since_the_last_report():
    assert batches(1.0, [0.3] * 7) == [[1, 2, 3, 4], [5, 6, 7]]  # 1.2 s, then the trial's last epoch
    assert batches(1.0, [0.3, 0.3, 0.3, 0.3, 0.3, 2.0, 0.3]) == [[1, 2, 3, 4], [5, 6], [7]]
    assert batches(1.0, [0.5, 0.5, 0.5]) == [[1, 2], [3]]  # exactly the interval: due
    assert batches(math.inf, [0.1] * 5) == [[1, 2, 3, 4, 5]]  # only the last epoch


def test_epochs_longer_than_the_interval_and_interval_zero_report_every_epoch():
    assert batches(1.0, [1.5, 1.0, 3.0]) == [[1], [2], [3]]
    assert batches(0.0, [0.01] * 4) == [[1], [2], [3], [4]]


def test_the_interval_comes_from_the_argument_the_environment_or_the_default(monkeypatch):
    monkeypatch.delenv("BITBENCH_REPORT_EVERY_S", raising=False)
    assert resolve_report_every_s() == REPORT_EVERY_S > 0
    monkeypatch.setenv("BITBENCH_REPORT_EVERY_S", " 0.25 ")
    assert resolve_report_every_s() == 0.25
    assert resolve_report_every_s(0) == 0.0  # the argument wins
    monkeypatch.setenv("BITBENCH_REPORT_EVERY_S", "soon")
    with pytest.raises(ValueError, match=r"\$BITBENCH_REPORT_EVERY_S must be a number of seconds, not 'soon'"):
        resolve_report_every_s()
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="report_every_s must be a number of seconds >= 0"):
            resolve_report_every_s(bad)


def test_a_bad_interval_fails_the_sweep_before_anything_starts(tmp_path):
    spec = make_spec()
    with pytest.raises(ValueError, match="report_every_s must be a number of seconds >= 0, not -1"):
        run_sweep(spec, MemorySink(), storage_path=tmp_path, report_every_s=-1)
    assert list(tmp_path.iterdir()) == []


# -- what a report of several epochs carries ---------------------------------------------------
def metrics(epoch: int) -> dict:
    return {**{k: 1 / 3 + epoch for k in METRIC_KEYS}, "epoch": epoch, "device": "cpu", "val_acc": None,
            "schedule": {"aqe.alpha": 0.1 * epoch}}


def test_a_report_keeps_the_last_epoch_at_the_top_and_the_earlier_ones_as_json_text():
    report = epochs_report([metrics(1), metrics(2), metrics(3)])
    assert isinstance(report[EARLIER_EPOCHS_KEY], str)  # one text column for Tune's loggers
    assert {k: v for k, v in report.items() if k != EARLIER_EPOCHS_KEY} == metrics(3)
    result = {**report, "training_iteration": 1}  # as the driver gets it
    assert reported_epochs(result) == [metrics(1), metrics(2), result]  # floats, None, dicts come back exactly
    assert epochs_report([metrics(4)]) == metrics(4)  # one epoch: a report as before
    assert reported_epochs(metrics(4)) == [metrics(4)]
    nan = reported_epochs(epochs_report([{"epoch": 1, "weight_flips": math.nan}, {"epoch": 2}]))
    assert math.isnan(nan[0]["weight_flips"])


# -- the driver's callback -----------------------------------------------------------------------
class OrderedSink(MemorySink):
    """A MemorySink that also puts provenance into ``events``."""

    def on_provenance(self, trial_key, provenance):
        super().on_provenance(trial_key, provenance)
        self.events.append(("provenance", trial_key, provenance["host"]))


def test_callback_delivers_every_epoch_of_a_batch_once_in_order():
    sink = OrderedSink(strict=True)
    trial = SimpleNamespace(config={"trial": {"key": "k"}}, status=Trial.RUNNING, error_file=None)

    def report(epochs, host=None):
        extra = {"provenance": json.dumps({"host": host})} if host else {}
        return {**epochs_report([metrics(e) for e in epochs]), "training_iteration": 1, **extra}

    with bound("fake-batches", SweepBinding(sink)) as b:
        cb = SinkCallback("fake-batches")
        cb.on_trial_start(0, [], trial)
        cb.on_trial_result(0, [], trial, report([1, 2, 3], host="h1"))
        cb.on_trial_result(0, [], trial, report([4]))
        cb.on_trial_start(0, [], trial)  # a retry from the checkpoint of epoch 2 (the snapshot lagged)
        cb.on_trial_result(0, [], trial, report([3, 4, 5, 6], host="h2"))
        cb.on_trial_result(0, [], trial, {"final": {"final_test_acc": 0.5}})
        cb.on_trial_complete(0, [], trial)
    assert [e for e in sink.events if e[0] in ("provenance", "epoch")] == [
        ("provenance", "k", "h1"), ("epoch", "k", 1), ("epoch", "k", 2), ("epoch", "k", 3), ("epoch", "k", 4),
        ("provenance", "k", "h2"), ("epoch", "k", 5), ("epoch", "k", 6)]
    assert b.delivered == {"k": 6} and b.suppressed == 2 and sink.duplicates == []
    assert set(sink.epochs["k"][2]) == set(METRIC_KEYS)  # Tune's keys and the batch's text stripped
    assert sink.epochs["k"][2]["schedule"] == {"aqe.alpha": 0.2} and sink.epochs["k"][2]["val_acc"] is None
    assert sink.ends["k"] == ("done", {"final_test_acc": 0.5}, None)


# -- real sweeps ----------------------------------------------------------------------------------
def make_spec(**over):
    base = {"name": "batch-test", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"],
            "bits": [{"w": 1, "a": 1}], "include_full_precision": False, "epochs": 3, "batch_size": 256,
            "max_retries": 1}
    return parse_spec({**base, **over})


def trial_dirs(experiment: Path) -> dict[str, Path]:
    """{trial key: its directory in the experiment}."""
    out = {}
    for path in experiment.glob("*/result.json"):
        first = json.loads(path.read_text().splitlines()[0])
        out[first["config"]["trial"]["key"]] = path.parent
    return out


def results_of(trial_dir: Path) -> list[dict]:
    """The results Tune recorded for a trial (its result.json), in order."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def untimed(sink: MemorySink) -> dict:
    return {key: {e: {k: v for k, v in m.items() if k not in TIMING_KEYS} for e, m in epochs.items()}
            for key, epochs in sink.epochs.items()}


@pytest.mark.slow
def test_short_epochs_reach_the_sink_once_each_in_fewer_reports_same_numbers(ray_session, monkeypatch):
    """With the interval far above the epochs (set by $BITBENCH_REPORT_EVERY_S in the driver) each trial reports
    its 3 epochs once, with the final report after: 2 results in Tune's files instead of 4. With interval 0 it
    reports every epoch, as trials of long epochs do. The sink gets every epoch once, and the same numbers both
    ways (training does not depend on when it reports; the JSON text of the earlier epochs is exact)."""
    spec = make_spec()
    keys = [t.key for t in spec.trials()]
    monkeypatch.setenv("BITBENCH_REPORT_EVERY_S", "1e9")
    hooks = FaultHooks(ray_session.fault_dir / "batched")
    batched = MemorySink(strict=True)
    assert run_sweep(spec, batched, experiment_name="batched", hooks=hooks) == {k: "done" for k in keys}
    assert {k: sorted(v) for k, v in batched.epochs.items()} == {k: [1, 2, 3] for k in keys}
    dirs = trial_dirs(ray_session.storage / "batched")
    for key in keys:
        assert hooks.log(key) == ["start 0", "trained 1", "trained 2", "trained 3"]  # the hook sees every epoch
        report, final = results_of(dirs[key])
        assert report["epoch"] == 3 and report["training_iteration"] == 1 and "provenance" in report
        assert [m["epoch"] for m in json.loads(report[EARLIER_EPOCHS_KEY])] == [1, 2]
        assert final["training_iteration"] == 2
        assert final["final"]["final_test_acc"] == batched.epochs[key][3]["test_acc"]
        with (dirs[key] / "progress.csv").open() as f:  # Tune's CSV logger: a row per report, the batch as text
            rows = list(csv.DictReader(f))
        assert len(rows) == 2 and json.loads(rows[0][EARLIER_EPOCHS_KEY]) == json.loads(report[EARLIER_EPOCHS_KEY])
        (checkpoint,) = dirs[key].glob("checkpoint_*/trial_state.pt")  # the only one reported: epoch 3's
        assert torch.load(checkpoint, weights_only=False)["epoch"] == 3
        assert len(batched.provenance[key]) == 1

    each = MemorySink(strict=True)
    assert run_sweep(spec, each, experiment_name="each-epoch", report_every_s=0) == {k: "done" for k in keys}
    dirs = trial_dirs(ray_session.storage / "each-epoch")
    assert sorted(dirs) == sorted(keys)
    for trial_dir in dirs.values():
        results = results_of(trial_dir)
        assert [r.get("epoch") for r in results] == [1, 2, 3, None]  # one report per epoch, then the final
        assert not any(EARLIER_EPOCHS_KEY in r for r in results)
    assert untimed(each) == untimed(batched)


@pytest.mark.slow
def test_a_trial_failing_before_its_batch_is_reported_retrains_the_batch_and_delivers_it_once(ray_session):
    """Epochs waiting for a report have no checkpoint: the attempt failing in epoch 3 (the hook raises before the
    report) leaves nothing reported, and the retry trains from scratch, every epoch reaching the sink once."""
    spec = make_spec(estimators=["aqe"])
    key = "aqe-w1a1-s0"
    hooks = FaultHooks(ray_session.fault_dir / "batch-lost")
    hooks.fail(key, 3)
    sink = MemorySink(strict=True)
    assert run_sweep(spec, sink, experiment_name="batch-lost", hooks=hooks, report_every_s=math.inf) == {key: "done"}
    assert hooks.log(key) == ["start 0", "trained 1", "trained 2", "trained 3"] * 2
    assert {k: sorted(v) for k, v in sink.epochs.items()} == {key: [1, 2, 3]} and sink.duplicates == []
    assert [s["attempt"] for s in sink.starts[key]] == [1, 2] and sink.ends[key][0] == "done"
    assert len(sink.provenance[key]) == 1  # the failed attempt reported nothing, its provenance neither


@pytest.mark.slow
def test_a_sink_failing_inside_a_batch_gets_the_batch_s_earlier_epochs_again_after_the_rerun(ray_session):
    """The sink raising on epoch 2 of the report [1, 2, 3] kills the driver after it stored epoch 1. The rerun
    goes back to the experiment's last snapshot (before that report), retrains the batch and delivers it again:
    epoch 1 a second time (sinks ignore repeats: ``service.sink.SqlSink``, ``MemorySink``), epochs 2 and 3 once."""
    spec = make_spec(estimators=["aqe"])
    key = "aqe-w1a1-s0"
    sink = CrashingSink(key, 2)
    with pytest.raises(ConnectionError):
        run_sweep(spec, sink, experiment_name="crash-in-batch", report_every_s=math.inf)
    assert sorted(sink.epochs[key]) == [1]
    assert run_sweep(spec, sink, experiment_name="crash-in-batch", report_every_s=math.inf) == {key: "done"}
    assert sorted(sink.epochs[key]) == [1, 2, 3] and sink.duplicates == [(key, 1)]
    assert sink.ends[key][0] == "done"

"""workers.sweep on a real local Ray Tune (digits, tiny epochs): delivery, retries, cancel, restore.

Faults are injected and attempts traced by the test-only trial hooks of ``tests.faults``, passed to
``run_sweep(hooks=...)``: ``hooks.fail(key, epoch)`` makes that trial raise once in that epoch (before
reporting it), ``hooks.log(key)`` reads the "start <resumed epoch>" and "trained <epoch>" lines of its
attempts.
"""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
import torch
from ray.tune import TuneError
from ray.tune.experiment import Trial

from tests.faults import FaultHooks
from workers.sinks import JsonlSink, MemorySink, ResultSink
from workers.spec import parse_spec
from workers.sweep import default_experiment_name, longest_first, main, run_sweep
from workers.train import METRIC_KEYS
from workers.tune_callback import SinkCallback, SweepBinding, bound

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def report_every_epoch(monkeypatch):
    """These tests trace checkpoints epoch by epoch: every epoch is reported (and checkpointed) on its own, as
    trials of long epochs are. Batched reports of short epochs: tests/test_report_batching.py."""
    monkeypatch.setenv("BITBENCH_REPORT_EVERY_S", "0")


def make_spec(**over):
    base = {"name": "sweep-test", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"],
            "bits": [{"w": 1, "a": 1}], "include_full_precision": False, "epochs": 2, "batch_size": 256,
            "max_retries": 1}
    return parse_spec({**base, **over})


def epochs_of(sink: MemorySink) -> dict[str, list[int]]:
    return {k: sorted(v) for k, v in sink.epochs.items()}


def hooks_for(ray_session, experiment: str) -> FaultHooks:
    return FaultHooks(ray_session.fault_dir / experiment)


def test_trials_start_longest_expected_first_float_last_grid_order_within():
    spec = make_spec(estimators=["aqe", "ste"], bits=[{"w": 1, "a": 1}, {"w": 2, "a": 2}, {"w": 1, "a": 2}],
                     include_full_precision=True, seeds=[0, 1])
    order = [t.key for t in longest_first(spec.trials())]
    assert sorted(order) == sorted(t.key for t in spec.trials())
    assert order == ["aqe-w2a2-s0", "ste-w2a2-s0", "aqe-w2a2-s1", "ste-w2a2-s1",  # grid order is seed-major
                     "aqe-w1a2-s0", "ste-w1a2-s0", "aqe-w1a2-s1", "ste-w1a2-s1",
                     "aqe-w1a1-s0", "ste-w1a1-s0", "aqe-w1a1-s1", "ste-w1a1-s1",
                     "float-w32a32-s0", "float-w32a32-s1"]


def test_memory_and_jsonl_sinks_satisfy_the_protocol(tmp_path):
    assert isinstance(MemorySink(), ResultSink)
    with JsonlSink(tmp_path / "r.jsonl") as s:
        assert isinstance(s, ResultSink)
        s.on_epoch("k", {"epoch": 1})
    with JsonlSink(tmp_path / "r.jsonl") as s:  # reopened: the epoch already in the file is not written again
        s.on_epoch("k", {"epoch": 1})
        s.on_epoch("k", {"epoch": 2})
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["metrics"]["epoch"] for r in lines] == [1, 2]


def test_callback_forwards_each_epoch_once_and_keeps_state():
    """The driver-side callback alone (fake trials): dedupe by highest epoch, finals, state round trip."""
    sink = MemorySink(strict=True)
    trial = SimpleNamespace(config={"trial": {"key": "k"}}, status=Trial.RUNNING, error_file=None)
    metrics = {k: 0.5 for k in METRIC_KEYS}
    with bound("fake", SweepBinding(sink)) as b:
        cb = SinkCallback("fake")
        cb.on_trial_start(0, [], trial)
        for epoch in (1, 2, 1, 2, 3):  # a retry re-reporting epochs 1 and 2
            first = {"provenance": json.dumps({"host": f"h{epoch}"})} if epoch == 1 else {}
            cb.on_trial_result(0, [], trial, {**metrics, "epoch": epoch, "training_iteration": 9, **first})
        cb.on_trial_result(0, [], trial, {"final": {"final_test_acc": 0.5}})
        cb.on_trial_complete(0, [], trial)
        state = cb.get_state()
    assert epochs_of(sink) == {"k": [1, 2, 3]} and b.suppressed == 2
    assert sink.provenance == {"k": [{"host": "h1"}, {"host": "h1"}]}  # the retry's too, though its epoch is not
    assert set(sink.epochs["k"][3]) == set(METRIC_KEYS)  # Tune's own keys are stripped
    assert sink.ends["k"] == ("done", {"final_test_acc": 0.5}, None)
    with bound("fake", SweepBinding(MemorySink(strict=True))) as b2:
        SinkCallback("fake").set_state(state)
        SinkCallback("fake").on_trial_result(0, [], trial, {**metrics, "epoch": 3})
    assert b2.delivered == {"k": 3} and b2.suppressed == 1 and b2.attempts == {"k": 1}


def test_all_trials_deliver_every_epoch_exactly_once(ray_session):
    spec = make_spec(bits=[{"w": 1, "a": 1}, {"w": 2, "a": 2}], include_full_precision=True)
    sink = MemorySink(strict=True)
    statuses = run_sweep(spec, sink, experiment_name="all-once", skip_keys={"float-w32a32-s0"})
    keys = [t.key for t in spec.trials() if not t.is_float]
    assert statuses == {"float-w32a32-s0": "skipped", **{k: "done" for k in keys}}
    assert epochs_of(sink) == {k: [1, 2] for k in keys}
    assert sink.duplicates == []
    assert {k: [s["attempt"] for s in v] for k, v in sink.starts.items()} == {k: [1] for k in keys}
    for key in keys:
        status, final, error = sink.ends[key]
        assert status == "done" and error is None
        assert final["epochs"] == 2 and final["final_test_acc"] == sink.epochs[key][2]["test_acc"]
        assert set(sink.epochs[key][1]) == set(METRIC_KEYS)
    assert "aqe.alpha" in sink.epochs["aqe-w1a1-s0"][1]["schedule"]
    import ray  # each trial's provenance, read in its Ray worker (on this node, no GPU asked for)

    here = ray.get_runtime_context().get_node_id()
    for key in keys:
        (record,) = sink.provenance[key]
        assert record["ray_node_id"] == here and record["ray_node_ip"] == ray.util.get_node_ip_address()
        assert record["ray_gpu_ids"] == [] and record["device"] == "cpu" and record["gpu"] is None
        assert record["ray"] == ray.__version__ and record["torch"] == torch.__version__


def test_failed_epoch_is_retried_from_the_checkpoint(ray_session):
    spec = make_spec(estimators=["aqe"])
    key = "aqe-w1a1-s0"
    hooks = hooks_for(ray_session, "retry")
    hooks.fail(key, 2)
    sink = MemorySink(strict=True)
    assert run_sweep(spec, sink, experiment_name="retry", hooks=hooks) == {key: "done"}
    assert hooks.log(key) == ["start 0", "trained 1", "trained 2", "start 1", "trained 2"]  # epoch 1 not retrained
    assert [s["attempt"] for s in sink.starts[key]] == [1, 2]
    assert epochs_of(sink) == {key: [1, 2]} and sink.duplicates == []
    assert sink.ends[key][0] == "done"
    assert [p["device"] for p in sink.provenance[key]] == ["cpu", "cpu"]  # each attempt's own


def test_cancel_stops_the_sweep_and_a_rerun_resumes_it(ray_session):
    """Cancelling ends every unfinished trial "cancelled"; running the sweep again (a dispatcher
    restart) resumes them from their checkpoints: no epoch trained or delivered twice."""
    spec = make_spec(epochs=6, include_full_precision=True)  # 3 trials on 2 CPUs: one waits
    hooks = hooks_for(ray_session, "cancel")
    sink = MemorySink(strict=True)
    first_epoch = threading.Event()
    real_on_epoch = sink.on_epoch

    def on_epoch(key, metrics):
        real_on_epoch(key, metrics)
        first_epoch.set()

    sink.on_epoch = on_epoch
    statuses = run_sweep(spec, sink, stop_requested=first_epoch.is_set, experiment_name="cancel", hooks=hooks)
    assert first_epoch.is_set()
    assert statuses == {t.key: "cancelled" for t in spec.trials()}
    assert {k: v[0] for k, v in sink.ends.items()} == statuses
    assert all(error is None for _, _, error in sink.ends.values())
    delivered = {k: max(v) for k, v in sink.epochs.items()}
    assert 1 <= sum(delivered.values()) <= 6  # stopped within a few epochs of the request, far from 3 × 6

    assert run_sweep(spec, sink, experiment_name="cancel", hooks=hooks) == {t.key: "done" for t in spec.trials()}
    assert epochs_of(sink) == {t.key: list(range(1, 7)) for t in spec.trials()}
    for key, last in delivered.items():  # resumed from the last checkpoint (its save may still have been pending)
        resumed_at = int([x for x in hooks.log(key) if x.startswith("start")][-1].split()[1])
        assert last - 1 <= resumed_at <= last


def test_cancel_before_start_cancels_every_cell(ray_session, monkeypatch):
    """Tune creates trials lazily (at most TUNE_MAX_PENDING_TRIALS_PG pending); cells it never
    created are cancelled too."""
    monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", "1")
    spec = make_spec(include_full_precision=True)
    sink = MemorySink(strict=True)
    statuses = run_sweep(spec, sink, stop_requested=lambda: True, experiment_name="cancel-at-once")
    assert statuses == {t.key: "cancelled" for t in spec.trials()}
    assert {k: v[0] for k, v in sink.ends.items()} == statuses and sink.epochs == {}


def test_restore_resumes_only_what_did_not_finish(ray_session):
    """Run 1: ste fails for good in epoch 2 (no retries), aqe finishes. Run 2 on the same experiment
    restores it: only ste resumes, from its epoch-1 checkpoint; nothing reaches the sink twice."""
    spec = make_spec(max_retries=0)
    hooks = hooks_for(ray_session, "restore")
    hooks.fail("ste-w1a1-s0", 2)
    sink = MemorySink(strict=True)
    first = run_sweep(spec, sink, experiment_name="restore", hooks=hooks)
    assert first == {"aqe-w1a1-s0": "done", "ste-w1a1-s0": "failed"}
    assert "injected fault in epoch 2" in sink.ends["ste-w1a1-s0"][2]
    n_events = len(sink.events)

    second = run_sweep(spec, sink, experiment_name="restore", hooks=hooks)
    assert second == {"aqe-w1a1-s0": "done", "ste-w1a1-s0": "done"}
    assert sink.events[n_events:] == [("start", "ste-w1a1-s0", 2), ("epoch", "ste-w1a1-s0", 2),
                                      ("end", "ste-w1a1-s0", "done")]
    assert hooks.log("aqe-w1a1-s0") == ["start 0", "trained 1", "trained 2"]  # not trained again
    assert hooks.log("ste-w1a1-s0")[-2:] == ["start 1", "trained 2"]
    assert epochs_of(sink) == {"aqe-w1a1-s0": [1, 2], "ste-w1a1-s0": [1, 2]} and sink.duplicates == []

    n_events = len(sink.events)
    assert run_sweep(spec, sink, experiment_name="restore", hooks=hooks) == second  # all finished: nothing runs
    assert sink.events[n_events:] == []


class CrashingSink(MemorySink):
    """Raises (like a database gone away) on one (trial, epoch), once: the driver dies mid-sweep."""

    def __init__(self, key: str, epoch: int):
        super().__init__()
        self.crash_at = (key, epoch)

    def on_epoch(self, trial_key, metrics):
        if (trial_key, metrics["epoch"]) == self.crash_at:
            self.crash_at = None
            raise ConnectionError("sink went away")
        super().on_epoch(trial_key, metrics)


def test_rerun_after_a_driver_crash_delivers_every_epoch_once(ray_session):
    """The sink raising kills fit() like a dying driver. Running the sweep again restores the
    experiment from its last snapshot (forced after every checkpoint) and continues: the epoch
    the sink refused arrives once more, nothing else twice."""
    spec = make_spec(epochs=3)
    sink = CrashingSink("aqe-w1a1-s0", 2)
    with pytest.raises(ConnectionError):
        run_sweep(spec, sink, experiment_name="crash")
    assert run_sweep(spec, sink, experiment_name="crash") == {"aqe-w1a1-s0": "done", "ste-w1a1-s0": "done"}
    assert epochs_of(sink) == {"aqe-w1a1-s0": [1, 2, 3], "ste-w1a1-s0": [1, 2, 3]}
    assert sink.duplicates == []
    assert {k: v[0] for k, v in sink.ends.items()} == {"aqe-w1a1-s0": "done", "ste-w1a1-s0": "done"}


def test_cli_writes_one_json_line_per_event(ray_session, tmp_path):
    spec = make_spec(estimators=["ste"], epochs=1)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.canonical_json())
    out = tmp_path / "results.jsonl"
    assert main([str(spec_file), "--out", str(out), "--storage", str(tmp_path / "tune")]) == 0
    events = [json.loads(x) for x in out.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "provenance", "epoch", "end"]
    assert events[1]["provenance"]["device"] == "cpu"
    assert events[-1]["status"] == "done" and events[2]["metrics"]["epoch"] == 1
    assert (tmp_path / "tune" / default_experiment_name(spec)).is_dir()


def test_fully_skipped_grid_needs_no_ray(tmp_path):
    spec = make_spec()
    keys = {t.key for t in spec.trials()}
    assert run_sweep(spec, MemorySink(), skip_keys=keys, storage_path=tmp_path) == {k: "skipped" for k in keys}


def test_storage_may_be_a_uri_checkpoints_and_restore_go_through_it(ray_session):
    """A ``file://`` URI takes the object-store path through pyarrow (as ``s3://`` would): the
    retry loads its checkpoint from there, and a rerun restores the finished experiment from it."""
    spec = make_spec(estimators=["ste"])
    key = "ste-w1a1-s0"
    hooks = hooks_for(ray_session, "via-uri")
    hooks.fail(key, 2)
    root = ray_session.storage.parent / "uri-store"
    sink = MemorySink(strict=True)
    statuses = run_sweep(spec, sink, storage_path=root.as_uri() + "/", experiment_name="via-uri", hooks=hooks)
    assert statuses == {key: "done"}
    assert hooks.log(key) == ["start 0", "trained 1", "trained 2", "start 1", "trained 2"]
    assert epochs_of(sink) == {key: [1, 2]}
    assert list((root / "via-uri").glob("*/checkpoint_*/trial_state.pt"))  # written under the URI's path
    n_events = len(sink.events)
    assert run_sweep(spec, sink, storage_path=root.as_uri(), experiment_name="via-uri", hooks=hooks) == {key: "done"}
    assert sink.events[n_events:] == [] and hooks.log(key)[-1] == "trained 2"


def test_a_driver_killed_between_a_checkpoint_and_the_snapshot_loses_and_repeats_nothing(ray_session, monkeypatch):
    """Issue 15: the driver dies after Tune registered epoch 2's checkpoint (deleting epoch 1's) but before the
    experiment snapshot naming it. The rerun restores a snapshot that names the deleted checkpoint: the trial
    resumes from the checkpoint that replaced it (epoch 2, whose result the sink has) and ends done, every epoch
    delivered once."""
    from tests.faults import DriverKilled, kill_driver_after_checkpoint

    spec = make_spec(estimators=["aqe"], epochs=3)
    key = "aqe-w1a1-s0"
    hooks = hooks_for(ray_session, "killed-in-window")
    kill_driver_after_checkpoint(monkeypatch, key, 2)
    sink = MemorySink()
    with pytest.raises((DriverKilled, TuneError)):
        run_sweep(spec, sink, experiment_name="killed-in-window", hooks=hooks)
    assert epochs_of(sink) == {key: [1, 2]}
    exp = ray_session.storage / "killed-in-window"
    assert not list(exp.glob("*/checkpoint_000000")) and list(exp.glob("*/checkpoint_000001/trial_state.pt"))

    assert run_sweep(spec, sink, experiment_name="killed-in-window", hooks=hooks) == {key: "done"}
    assert [x for x in hooks.log(key) if x.startswith("start")] == ["start 0", "start 2"]  # epochs 1, 2 kept
    assert epochs_of(sink) == {key: [1, 2, 3]} and sink.duplicates == []
    assert [s["attempt"] for s in sink.starts[key]] == [1, 2] and sink.ends[key][0] == "done"


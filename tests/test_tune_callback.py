"""workers.tune_callback's driver-side bookkeeping without Ray running: batched reports, polling the stop flag,
the stop's grace period, the registry of live sweeps, error texts, and the callback's events on fake trials.
A real Tune run of the same callback: tests/test_sweep.py."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from ray.tune.experiment import Trial

import workers.tune_callback as tc
from workers.sinks import MemorySink
from workers.train import METRIC_KEYS
from workers.tune_callback import SinkCallback, SweepBinding, bound, error_text


class Clock:
    """time.monotonic as the test sets it."""

    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(tc.time, "monotonic", c)
    return c


def fake_trial(key="k", error_file=None, error=None):
    return SimpleNamespace(config={"trial": {"key": key}}, status=Trial.RUNNING, error_file=error_file,
                           get_error=lambda: error)


def metrics(epoch):
    return {**{k: 0.25 for k in METRIC_KEYS}, "epoch": epoch}


# -- reports of several epochs ----------------------------------------------------------------
def test_a_report_of_several_epochs_carries_the_earlier_ones_as_json_and_reads_back_in_order():
    batch = [metrics(1), metrics(2), metrics(3)]
    report = tc.epochs_report(batch)
    assert {k: v for k, v in report.items() if k != tc.EARLIER_EPOCHS_KEY} == metrics(3)
    assert json.loads(report[tc.EARLIER_EPOCHS_KEY]) == [metrics(1), metrics(2)]
    assert tc.reported_epochs(report)[:2] == [metrics(1), metrics(2)] and tc.reported_epochs(report)[2] is report
    single = tc.epochs_report([metrics(4)])
    assert single == metrics(4) and tc.EARLIER_EPOCHS_KEY not in single and tc.reported_epochs(single) == [single]


# -- the stop flag ----------------------------------------------------------------------------
def test_the_stop_flag_is_polled_at_most_every_poll_s_and_latches(clock):
    asked, answers = [], iter([False, False, True, False])

    def stop_requested():
        asked.append(clock.now)
        return next(answers)

    assert SweepBinding(MemorySink()).cancel_requested() is False  # without a stop flag: never stopped
    b = SweepBinding(MemorySink(), stop_requested=stop_requested, poll_s=0.5)
    assert b.cancel_requested() is False and asked == [100.0]  # the first call always polls
    clock.now = 100.4
    assert b.cancel_requested() is False and asked == [100.0]  # within poll_s: not asked again
    clock.now = 100.5
    assert b.cancel_requested() is False and asked == [100.0, 100.5]  # poll_s later exactly: asked
    clock.now = 101.5
    assert b.cancel_requested() is True
    clock.now = 200.0
    assert b.cancel_requested() is True and len(asked) == 3  # latched: never asked again


def test_a_stop_waits_for_a_snapshot_of_everything_delivered_or_the_grace_period(clock):
    b = SweepBinding(MemorySink(), stop_grace_s=30.0)
    b.delivered["k"] = 2
    assert b.ready_to_stop() is False  # no snapshot yet
    b.state()  # the snapshot Tune just took holds epoch 2
    assert b.ready_to_stop() is True
    b.delivered["k"] = 3
    b.ended["j"] = "done"
    assert b.ready_to_stop() is False  # delivered after the snapshot: a restore would repeat it
    clock.now = 130.0
    assert b.ready_to_stop() is False  # 30 s after the stop was first asked: not yet more than the grace
    clock.now = 130.001
    assert b.ready_to_stop() is True


def test_the_state_holds_the_bookkeeping_and_loading_adds_to_what_is_there():
    b = SweepBinding(MemorySink())
    b.delivered.update(a=2)
    b.ended.update(a="done")
    b.attempts.update(a=1, c=2)
    b.finals.update(c={"final_test_acc": 0.5})
    state = b.state()
    assert state == {"delivered": {"a": 2}, "ended": {"a": "done"}, "attempts": {"a": 1, "c": 2},
                     "finals": {"c": {"final_test_acc": 0.5}}}
    b.delivered["a"] = 9
    assert state["delivered"] == {"a": 2}  # a copy
    other = SweepBinding(MemorySink())
    other.delivered.update(z=1)
    other.load_state(state)
    assert other.delivered == {"z": 1, "a": 2} and other.attempts == {"a": 1, "c": 2}
    assert other.finals == {"c": {"final_test_acc": 0.5}} and other.ended == {"a": "done"}
    other.load_state({})  # an older state without some keys
    assert other.delivered == {"z": 1, "a": 2}


def test_a_sink_error_is_remembered_and_raised():
    class Failing(MemorySink):
        def on_trial_end(self, *args):
            raise OSError("disk full")

    b = SweepBinding(Failing())
    b.finals["k"] = {"final_test_acc": 0.5}
    with pytest.raises(OSError, match="disk full"):
        b.end("k", "done", {"final_test_acc": 0.5})
    assert isinstance(b.sink_error, OSError) and "k" not in b.ended and b.finals == {"k": {"final_test_acc": 0.5}}


# -- live sweeps by token ---------------------------------------------------------------------
def test_one_live_sweep_per_token_and_none_after_it_ends():
    a, b = SweepBinding(MemorySink()), SweepBinding(MemorySink())
    with bound("tok", a) as got:
        assert got is a and tc.binding_for("tok") is a
        with pytest.raises(RuntimeError, match="'tok' is already running"):
            with bound("tok", b):
                pass
        assert tc.binding_for("tok") is a  # the refused one did not replace or remove it
        with bound("other", b):
            assert tc.binding_for("other") is b
    with pytest.raises(RuntimeError, match="no live sweep 'tok'"):
        tc.binding_for("tok")
    with pytest.raises(ValueError):  # an exception inside still unregisters it
        with bound("tok", a):
            raise ValueError
    assert "tok" not in tc._BINDINGS


# -- a failed trial's error text --------------------------------------------------------------
def test_the_error_text_is_the_last_failure_of_the_error_file(tmp_path):
    f = tmp_path / "error.txt"
    f.write_text("Failure # 1 (occurred at …)\nfirst traceback\n\nFailure # 2 (occurred at …)\nsecond traceback\n\n")
    assert error_text(fake_trial(error_file=str(f), error="ignored")) == "Failure # 2 (occurred at …)\nsecond traceback"
    f.write_text("  a traceback without a header  \n")
    assert error_text(fake_trial(error_file=str(f))) == "a traceback without a header"


def test_a_long_error_text_keeps_its_last_characters(tmp_path):
    f = tmp_path / "error.txt"
    body = "".join(chr(ord("a") + i % 26) for i in range(20_000))
    f.write_text("Failure # 1\n" + body)
    text = error_text(fake_trial(error_file=str(f)))
    assert len(text) == 8000 and text == body[-8000:]  # docs/CONTRACTS.md: at most the last 8,000 characters


def test_without_a_readable_error_file_the_text_is_tunes_or_a_default(tmp_path):
    missing = str(tmp_path / "gone.txt")
    assert error_text(fake_trial(error_file=missing, error="RuntimeError: boom")) == "RuntimeError: boom"
    assert error_text(fake_trial(error_file=None, error="Failure # 3\nx")) == "Failure # 3\nx"
    assert error_text(fake_trial(error_file=missing)) == "trial failed (no error text recorded)"


# -- the callback's events --------------------------------------------------------------------
def test_each_start_counts_an_attempt_and_reopens_an_ended_trial():
    sink = MemorySink()
    with bound("t", SweepBinding(sink, device="cuda:0")) as b:
        cb = SinkCallback("t")
        cb.on_trial_start(0, [], fake_trial())
        cb.on_trial_error(0, [], fake_trial(error="boom"))
        assert b.ended == {"k": "failed"}
        cb.on_trial_start(0, [], fake_trial())
    assert b.attempts == {"k": 2} and b.ended == {}
    assert sink.starts["k"] == [{"device": "cuda:0", "attempt": 1}, {"device": "cuda:0", "attempt": 2}]
    assert sink.ends["k"] == ("failed", None, "boom")


def test_a_trial_that_completes_without_final_metrics_failed():
    sink = MemorySink()
    with bound("t", SweepBinding(sink)) as b:
        cb = SinkCallback("t")
        cb.on_trial_start(0, [], fake_trial())
        cb.on_trial_complete(0, [], fake_trial())
    assert sink.ends["k"] == ("failed", None, "the trial ended without reporting its final metrics")
    assert b.ended == {"k": "failed"}


def test_a_batched_report_forwards_its_new_epochs_in_order_and_the_final_waits_for_completion():
    sink = MemorySink(strict=True)
    with bound("t", SweepBinding(sink)) as b:
        cb = SinkCallback("t")
        cb.on_trial_start(0, [], fake_trial())
        cb.on_trial_result(0, [], fake_trial(), tc.epochs_report([metrics(1), metrics(2)]))
        cb.on_trial_result(0, [], fake_trial(), tc.epochs_report([metrics(2), metrics(3), metrics(4)]))
        cb.on_trial_result(0, [], fake_trial(), {tc.FINAL_KEY: {"final_test_acc": 0.75}, "epoch": 4})
        assert b.finals == {"k": {"final_test_acc": 0.75}} and "k" not in sink.ends
        cb.on_trial_complete(0, [], fake_trial())
        cb.on_experiment_end([fake_trial("k"), fake_trial("j")])
    assert sorted(sink.epochs["k"]) == [1, 2, 3, 4] and b.suppressed == 1 and b.delivered == {"k": 4}
    assert sink.ends["k"] == ("done", {"final_test_acc": 0.75}, None) and b.finals == {}
    assert b.trial_keys == ["k", "j"]


def test_the_step_end_stops_the_sweep_only_when_asked_and_ready(clock):
    with bound("t", SweepBinding(MemorySink(), stop_requested=lambda: True)) as b:
        cb = SinkCallback("t")
        b.delivered["k"] = 1
        cb.on_step_end(0, [])  # asked, but the snapshot does not hold epoch 1 yet
        cb.get_state()
        with pytest.raises(tc.SweepStopped):
            cb.on_step_end(0, [])
    with bound("t", SweepBinding(MemorySink(), stop_requested=lambda: False)) as b:
        b.state()  # ready, but not asked
        SinkCallback("t").on_step_end(0, [])

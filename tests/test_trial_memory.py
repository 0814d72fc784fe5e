"""A trial leaves nothing behind in its process: Tune's ``reuse_actors`` runs the next trial (or the
retry of a failed one) in the same process, which must find the device's memory free."""
from __future__ import annotations

import traceback
import weakref

import pytest
import torch

import workers.train
from workers.spec import parse_spec
from workers.train import run_trial


def make_spec(**over):
    return parse_spec({"name": "mem", "estimators": ["aqe"], "include_full_precision": False, "epochs": 2,
                       "batch_size": 256, **over})


class Spy:
    """Weak references to each attempt's model, optimizer and training tensors (as ``run_trial`` builds them)."""

    def __init__(self, monkeypatch):
        self.attempts: list[dict[str, weakref.ref]] = []
        build_model, build_optimizer, load_dataset = (workers.train.build_model, workers.train.build_optimizer,
                                                      workers.train.load_dataset)

        def data(*args, **kwargs):
            splits = load_dataset(*args, **kwargs)
            self.attempts.append({"train_x": weakref.ref(splits.train_x), "train_y": weakref.ref(splits.train_y)})
            return splits

        def model(*args, **kwargs):
            m = build_model(*args, **kwargs)
            self.attempts[-1]["model"] = weakref.ref(m)
            return m

        def optimizer(*args, **kwargs):
            opt = build_optimizer(*args, **kwargs)
            self.attempts[-1]["optimizer"] = weakref.ref(opt)
            return opt

        monkeypatch.setattr(workers.train, "load_dataset", data)
        monkeypatch.setattr(workers.train, "build_model", model)
        monkeypatch.setattr(workers.train, "build_optimizer", optimizer)

    def alive(self, attempt: int) -> list[str]:
        return sorted(name for name, ref in self.attempts[attempt].items() if ref() is not None)


ALL = ["model", "optimizer", "train_x", "train_y"]


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def test_a_finished_trial_frees_its_model_optimizer_and_data(spy):
    spec = make_spec()
    seen = []
    final = run_trial(spec, spec.trials()[0], on_epoch=lambda m, s: seen.append(spy.alive(0)), threads=1)
    assert final["epochs"] == 2
    assert seen == [ALL, ALL]  # held while training …
    assert spy.alive(0) == []  # … and gone when it returns


def test_a_failed_attempt_frees_them_while_its_error_is_kept_and_so_does_the_retry(spy):
    """Tune keeps a failed attempt's error while it retries the trial in the same process: the error's
    traceback must not keep the attempt's tensors."""
    spec = make_spec()
    trial = spec.trials()[0]
    states = []

    def fail_in_epoch_2(metrics, state):
        if metrics["epoch"] == 2:
            raise RuntimeError("injected fault in epoch 2")
        states.append(state)

    with pytest.raises(RuntimeError) as failure:
        run_trial(spec, trial, on_epoch=fail_in_epoch_2, threads=1)
    error = failure.value
    assert spy.alive(0) == []
    text = "".join(traceback.format_exception(error))  # still a full traceback, for the trial's error
    assert "injected fault in epoch 2" in text and "in _run" in text and "in fail_in_epoch_2" in text

    during_retry = []
    run_trial(spec, trial, on_epoch=lambda m, s: during_retry.append((spy.alive(0), spy.alive(1))),
              resume_state=states[0], threads=1)
    assert during_retry == [([], ALL)]
    assert spy.alive(1) == [] and error is failure.value


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_memory_returns_to_where_it_was_after_a_trial_and_after_a_failed_attempt():
    spec = make_spec(resources={"gpu": 0.25})
    trial = spec.trials()[0]
    run_trial(spec, trial, on_epoch=lambda m, s: None)  # warm-up: cuBLAS workspaces and the like stay
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    peaks = []

    def fail_in_epoch_2(metrics, state):
        peaks.append(torch.cuda.memory_allocated())
        if metrics["epoch"] == 2:
            raise RuntimeError("injected fault")

    with pytest.raises(RuntimeError) as failure:
        run_trial(spec, trial, on_epoch=fail_in_epoch_2)
    assert min(peaks) > allocated  # the model and the data set were on the GPU …
    assert torch.cuda.memory_allocated() == allocated  # … and are not, though the error is kept
    assert torch.cuda.memory_reserved() <= reserved  # the cache went back to the driver
    run_trial(spec, trial, on_epoch=lambda m, s: None)
    assert torch.cuda.memory_allocated() == allocated and torch.cuda.memory_reserved() <= reserved
    assert failure.value is not None

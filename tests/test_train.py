"""workers.train.run_trial without Ray: the metrics contract, schedules, seeding, bit-exact resume."""
from __future__ import annotations

import io

import pytest
import torch

import estimators
from workers.spec import parse_spec
from workers.train import FINAL_KEYS, METRIC_KEYS, accuracies, build_model, build_scheduler, evaluate, run_trial
from workers.datasets import load_dataset

TIMING = ("epoch_seconds", "images_per_s")


def make_spec(**over):
    base = {"name": "t", "dataset": "digits", "model": "digits_net", "estimators": ["aqe", "ste"],
            "bits": [{"w": 1, "a": 1}], "epochs": 2, "batch_size": 128}
    return parse_spec({**base, **over})


def trial_of(spec, key):
    return next(t for t in spec.trials() if t.key == key)


def train(spec, key, **kw):
    """run_trial, collecting (metrics, state) per epoch; the state goes through torch.save/load
    as it does in a Tune checkpoint."""
    seen = []

    def on_epoch(metrics, state):
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        seen.append((metrics, torch.load(buf, weights_only=False)))

    final = run_trial(spec, trial_of(spec, key), on_epoch=on_epoch, threads=1, **kw)
    return final, seen


def no_timing(m):
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.fixture(scope="module")
def aqe_run():
    spec = make_spec()
    return spec, *train(spec, "aqe-w1a1-s0")


def test_metrics_follow_the_contract(aqe_run):
    spec, final, seen = aqe_run
    assert [m["epoch"] for m, _ in seen] == [1, 2]
    for m, _ in seen:
        assert set(m) == set(METRIC_KEYS)
        for k in ("train_acc", "val_acc", "test_acc", "test_top5"):
            assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0
        assert m["test_top5"] >= m["test_acc"]  # digits: 10 classes, so top-5 is reported
        assert isinstance(m["train_loss"], float) and m["train_loss"] > 0
        assert m["epoch_seconds"] > 0 and m["images_per_s"] > 0
        assert m["device"] == "cpu"
        assert all(isinstance(v, float) for v in m["schedule"].values())
    assert seen[0][0]["lr"] == pytest.approx(0.01) and seen[1][0]["lr"] == pytest.approx(0.01 * 0.98)
    assert seen[-1][0]["test_acc"] > 0.3  # two epochs on digits learn something even at W1A1


def test_aqe_alpha_follows_its_schedule(aqe_run):
    _, _, seen = aqe_run
    # default "exp" schedule: α_e = 0.5·2^(e/E), reaching 1 at the last epoch
    assert [m["schedule"]["aqe.alpha"] for m, _ in seen] == pytest.approx([0.5 * 2 ** 0.5, 1.0])


def test_final_record(aqe_run):
    spec, final, seen = aqe_run
    assert set(final) == set(FINAL_KEYS)
    last = seen[-1][0]
    assert final["final_test_acc"] == last["test_acc"] and final["final_val_acc"] == last["val_acc"]
    assert final["final_test_top5"] == last["test_top5"]
    best = max(seen, key=lambda s: s[0]["val_acc"])[0]
    assert final["best_val_acc"] == best["val_acc"] and final["best_epoch"] == best["epoch"]
    assert final["epochs"] == 2
    data = load_dataset("digits", seed=0)
    storage = estimators.weight_storage(build_model(spec, trial_of(spec, "aqe-w1a1-s0"), data))
    assert final["weight_bits_total"] == storage.bits > 0
    assert final["weight_mib"] == pytest.approx(storage.mib)


def test_float_trial_has_no_quantized_weights_or_schedule():
    spec = make_spec(epochs=1)
    final, seen = train(spec, "float-w32a32-s0")
    assert seen[0][0]["schedule"] == {}
    assert final["weight_bits_total"] == 0 and final["weight_mib"] == 0.0


@pytest.mark.parametrize("over", [
    {},  # adam, exponential decay
    {"estimators": ["pact"], "bits": [{"w": 2, "a": 2}], "optimizer": {"name": "sgd", "lr": 0.05, "nesterov": True,
                                                                       "weight_decay": 1e-4},
     "lr_schedule": {"name": "cosine", "eta_min": 0.001}},
], ids=["aqe-adam-exp", "pact-sgd-cosine"])
def test_resume_after_epoch_1_is_bit_exact(over):
    spec = make_spec(epochs=3, **over)
    key = next(t.key for t in spec.trials() if not t.is_float)
    final, seen = train(spec, key)
    resumed_final, resumed = train(spec, key, resume_state=seen[0][1])
    assert resumed_final == final
    assert [no_timing(m) for m, _ in resumed] == [no_timing(m) for m, _ in seen[1:]]
    for (_, a), (_, b) in zip(resumed, seen[1:]):
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_from_last_epoch_only_reports_final(aqe_run):
    spec, final, seen = aqe_run
    calls = []
    again = run_trial(spec, trial_of(spec, "aqe-w1a1-s0"), on_epoch=lambda m, s: calls.append(m),
                      resume_state=seen[-1][1], threads=1)
    assert calls == [] and again == final


def test_state_of_another_trial_is_refused(aqe_run):
    spec, _, seen = aqe_run
    with pytest.raises(ValueError, match="ste-w1a1-s0"):
        run_trial(spec, trial_of(spec, "ste-w1a1-s0"), on_epoch=lambda m, s: None, resume_state=seen[0][1])


def test_same_seed_same_run_other_seed_other_run():
    spec = make_spec(epochs=1, seeds=[0, 1], estimators=["ste"])
    a = train(spec, "ste-w1a1-s0")[1][0][0]
    b = train(spec, "ste-w1a1-s0")[1][0][0]
    c = train(spec, "ste-w1a1-s1")[1][0][0]
    assert no_timing(a) == no_timing(b)
    assert no_timing(a) != no_timing(c)


@pytest.mark.parametrize("schedule, expected", [
    ({"name": "constant"}, [0.1, 0.1, 0.1, 0.1]),
    ({"name": "exponential", "gamma": 0.5}, [0.1, 0.05, 0.025, 0.0125]),
    ({"name": "cosine", "eta_min": 0.0}, [0.1, 0.085355, 0.05, 0.014645]),
    ({"name": "step", "gamma": 0.1, "milestones": [2]}, [0.1, 0.1, 0.01, 0.01]),
])
def test_lr_schedules_per_epoch(schedule, expected):
    spec = make_spec(epochs=4, lr_schedule=schedule)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = build_scheduler(opt, spec.lr_schedule, spec.epochs)
    lrs = []
    for _ in range(spec.epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(expected, abs=1e-6)


def test_dataset_options_reach_the_loader_and_nothing_else_does(monkeypatch):
    """A spec's options arrive as the data set's validated fields; where data live comes from the caller
    (the dispatcher's setting), and downloading from the environment only."""
    import workers.train

    calls = []

    def spy(name, **kw):
        calls.append(kw)
        return load_dataset(name, **kw)

    monkeypatch.setattr(workers.train, "load_dataset", spy)
    monkeypatch.setenv("BITBENCH_ALLOW_DOWNLOAD", "0")
    spec = make_spec(dataset="synthetic", epochs=1, estimators=["ste"], include_full_precision=False,
                     dataset_options={"shape": [1, 8, 8], "n_train": 60, "n_val": 20, "n_test": 30, "num_classes": 4,
                                      "train_size": 40})
    final, seen = train(spec, "ste-w1a1-s0", data_dir="/nowhere")
    [kw] = calls
    assert kw.pop("data_dir") == "/nowhere" and kw.pop("seed") == 0 and str(kw.pop("device")) == "cpu"
    assert kw == {"val_size": None, "train_size": 40, "split_seed": 0, "shape": [1, 8, 8], "num_classes": 4,
                  "n_train": 60, "n_val": 20, "n_test": 30, "separation": 0.1}
    assert final["epochs"] == 1 and len(seen) == 1


def test_top1_and_top5_count_the_label_among_the_largest_logits():
    # the label's logit ranks 1st, 5th, 6th (of 6) and 1st: top-1 2/4, top-5 3/4
    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [9., 1, 2, 3, 4, 5], [5., 4, 0, 3, 2, 1], [1., 2, 0, 0, 0, 0]])
    labels = torch.tensor([0, 2, 2, 1])
    batches = [(logits[:3], labels[:3]), (logits[3:], labels[3:])]
    assert accuracies(torch.nn.Identity(), batches, top5=True) == (0.5, 0.75)
    assert accuracies(torch.nn.Identity(), batches) == (0.5, None)
    assert evaluate(torch.nn.Identity(), batches) == 0.5
    assert accuracies(torch.nn.Identity(), []) == (None, None)


def test_top5_is_not_reported_with_fewer_than_six_classes():
    spec = make_spec(dataset="synthetic", model="digits_net", epochs=1, include_full_precision=False,
                     estimators=["ste"], dataset_options={"shape": [1, 8, 8], "num_classes": 5, "n_train": 64,
                                                          "n_val": 16, "n_test": 32})
    final, seen = train(spec, "ste-w1a1-s0")
    assert seen[0][0]["test_top5"] is None and final["final_test_top5"] is None
    assert seen[0][0]["test_acc"] is not None

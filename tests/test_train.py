"""workers.train.run_trial without Ray: the metrics contract, schedules, seeding, bit-exact resume."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import estimators
import workers.train
from estimators.layers import QUANTIZED_LAYERS
from workers.datasets import load_dataset
from workers.spec import Optimizer, parse_spec
from workers.train import (
    FINAL_KEYS,
    METRIC_KEYS,
    accuracies,
    build_model,
    build_optimizer,
    build_scheduler,
    evaluate,
    run_trial,
    train_epoch,
)

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
    for (_, a), (_, b) in zip(resumed, seen[1:], strict=False):
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


@pytest.fixture
def epoch_labels(monkeypatch):
    """The training labels of every epoch, in the order the trainer's batches brought them."""
    orders = []
    real_train_epoch = workers.train.train_epoch

    def spy(model, opt, batches, forward=None):
        labels = []

        def recorded():
            for xb, yb in batches:
                labels.append(yb.clone())
                yield xb, yb
        out = real_train_epoch(model, opt, recorded(), forward)
        orders.append(torch.cat(labels))
        return out

    monkeypatch.setattr(workers.train, "train_epoch", spy)
    return orders


def test_data_order_follows_the_seed(epoch_labels):
    """Two seeds of one trial shuffle differently (the split is fixed, so only the loader's order can differ);
    the same seed repeats its order; every training image comes once per epoch."""
    spec = make_spec(epochs=1, seeds=[0, 1], estimators=["ste"], include_full_precision=False)
    for key in ("ste-w1a1-s0", "ste-w1a1-s0", "ste-w1a1-s1"):
        train(spec, key)
    same, again, other = epoch_labels
    assert torch.equal(same, again)
    train_y = load_dataset("digits", seed=0).train_y
    assert torch.equal(same.sort().values, train_y.sort().values)
    assert torch.equal(other.sort().values, train_y.sort().values)  # the same images ...
    assert not torch.equal(same, other)  # ... in another order


def test_a_last_batch_of_one_is_dropped(epoch_labels):
    """BatchNorm cannot train on one sample: 1077 training images in batches of 269 leave one out."""
    spec = make_spec(epochs=1, estimators=["ste"], include_full_precision=False, batch_size=269)
    train(spec, "ste-w1a1-s0")
    assert len(load_dataset("digits", seed=0).train_y) == 1077 and len(epoch_labels[0]) == 1076


@pytest.mark.parametrize(("n_train", "batch", "drops"), [
    (1077, 269, True), (129, 128, True), (1077, 128, False), (256, 128, False), (1, 128, False), (1, 1, False)])
def test_only_a_last_batch_of_one_image_is_dropped_never_the_whole_training_set(n_train, batch, drops):
    assert workers.train.drops_last_batch(n_train, batch) is drops


def test_the_packed_check_takes_whole_test_images_within_its_byte_budget(monkeypatch):
    """n = PACKED_CHECK_BYTES // (4 · image size), at least one and at most PACKED_CHECK_SAMPLES; none for float."""
    digits = load_dataset("digits", seed=0)
    spec = make_spec(estimators=["ste"])
    seen = []

    def check(model, x, y):
        seen.append((len(x), y.tolist()))
        return {"packed_bytes": 7, "packed_agreement": 1.0}

    quantized, full = trial_of(spec, "ste-w1a1-s0"), next(t for t in spec.trials() if t.is_float)
    for budget, n in ((4 * 64 * 10 + 255, 10), (100, 1), (2**40, len(digits.test_y))):  # 1×8×8 float32 images
        monkeypatch.setattr(workers.train, "PACKED_CHECK_BYTES", budget)
        assert workers.train.packed_metrics(None, quantized, digits, check) == {"packed_bytes": 7,
                                                                                "packed_agreement": 1.0}
        assert seen.pop() == (n, digits.test_y[:n].tolist())
    monkeypatch.setattr(workers.train, "PACKED_CHECK_SAMPLES", 3)
    workers.train.packed_metrics(None, quantized, digits, check)
    assert seen.pop()[0] == 3
    assert workers.train.packed_metrics(None, full, digits, check) == {"packed_bytes": None, "packed_agreement": None}
    assert workers.train.packed_metrics(None, quantized, digits, None)["packed_agreement"] is None and seen == []


def test_best_epoch_is_the_first_of_equal_validation_accuracies(monkeypatch):
    monkeypatch.setattr(workers.train, "evaluate", lambda model, batches: 0.5)
    spec = make_spec(epochs=3, estimators=["ste"], include_full_precision=False)
    final, seen = train(spec, "ste-w1a1-s0")
    assert [m["val_acc"] for m, _ in seen] == [0.5, 0.5, 0.5]
    assert final["best_epoch"] == 1 and final["best_val_acc"] == 0.5
    first = seen[0][0]["test_acc"]  # selected: the test accuracy of that first epoch
    assert [s["best"] for _, s in seen] == [{"val_acc": 0.5, "epoch": 1, "test_acc": first}] * 3
    assert (final["selected_epoch"], final["selected_test_acc"]) == (1, first)


def test_each_epochs_state_is_a_copy_that_later_training_leaves_alone():
    """on_epoch's state is a snapshot: the model and optimizer tensors of epoch 1 are not the live ones, which
    epoch 2 goes on to change (a checkpoint that aliased them would save epoch 2's weights as epoch 1's)."""
    spec = make_spec(estimators=["ste"], include_full_precision=False)
    states, saved = [], []

    def on_epoch(metrics, state):
        states.append(state)
        saved.append(copy.deepcopy(state["model"]))

    run_trial(spec, trial_of(spec, "ste-w1a1-s0"), on_epoch=on_epoch, threads=1)
    first, second = states[0]["model"], states[1]["model"]
    assert all(torch.equal(first[k], saved[0][k]) for k in first)  # unchanged by epoch 2 …
    assert any(not torch.equal(first[k], second[k]) for k in first)  # … which did change the weights


def test_a_cpu_trial_runs_with_deterministic_algorithms_and_restores_the_setting():
    spec = make_spec(epochs=1, estimators=["ste"], include_full_precision=False)
    seen = []
    before = torch.are_deterministic_algorithms_enabled()
    run_trial(spec, trial_of(spec, "ste-w1a1-s0"), threads=1,
              on_epoch=lambda m, s: seen.append(torch.are_deterministic_algorithms_enabled()))
    assert seen == [True] and torch.are_deterministic_algorithms_enabled() == before


def test_images_per_second_is_training_images_over_training_time(aqe_run):
    """images_per_s = images ÷ the epoch's training seconds, which are part of its epoch_seconds."""
    _, _, seen = aqe_run
    n_train = len(load_dataset("digits", seed=0).train_y)
    for m, _ in seen:
        assert n_train <= m["images_per_s"] * m["epoch_seconds"] < 10 * n_train


def test_optimizers_get_the_specs_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    sgd = build_optimizer(params, Optimizer(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}
    plain = build_optimizer(params, Optimizer(name="sgd", momentum=0.0, nesterov=True))
    assert plain.defaults["nesterov"] is False  # torch refuses Nesterov without momentum
    assert type(build_optimizer(params, Optimizer(name="adamw"))) is torch.optim.AdamW


def test_an_epoch_reports_mean_loss_accuracy_and_images_or_nothing_without_batches():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, acc, n = train_epoch(model, opt, [])
    assert n == 0 and loss != loss and acc != acc  # NaN: nothing to average
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(x)
    before = copy.deepcopy(model.state_dict())
    loss, acc, n = train_epoch(model, opt, [(x[:2], y[:2]), (x[2:], y[2:])])  # without a forward of its own
    assert n == 3 and not torch.equal(model.weight, before["weight"])  # the model's, and it trained
    # with lr 0 every batch sees the model as it was: the epoch's loss and accuracy are then out's
    model.load_state_dict(before)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, acc, n = train_epoch(model, opt, [(x[:2], y[:2]), (x[2:], y[2:])])
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(out, y).item())  # the mean over images
    assert acc == (out.argmax(1) == y).sum().item() / 3 and n == 3


def test_evaluation_builds_no_autograd_graph():
    """Evaluation only reads: no layer runs with gradients on (accuracies, the training forward's accuracy)."""
    spec = make_spec(estimators=["aqe"], include_full_precision=False)
    data = load_dataset("digits", seed=0)
    model = build_model(spec, trial_of(spec, "aqe-w1a1-s0"), data)
    grad_on = []
    for m in model.modules():
        m.register_forward_hook(lambda mod, args, out: grad_on.append(torch.is_grad_enabled()))
    batches = data.loader("val", 64)
    accuracies(model, batches, top5=True)
    workers.train.evaluate_training_forward(model, batches)
    assert grad_on and not any(grad_on)


def test_seeding_reaches_numpy():
    import numpy as np

    draws = []
    for seed in (1, 1, 2, 65, 2**32 - 1):
        workers.train.seed_everything(seed)
        draws.append(np.random.rand())
    assert draws[0] == draws[1] and len(set(draws)) == 4


def test_latent_weights_stay_clipped_at_a_large_lr():
    """Plain SGD at lr 5 pushes AQE's latent weights far beyond [−1, 1] (to 11.8 unclipped); the trainer
    clips them after every step."""
    spec = make_spec(epochs=1, estimators=["aqe"], include_full_precision=False, optimizer={"name": "sgd", "lr": 5.0})
    trial = trial_of(spec, "aqe-w1a1-s0")
    _, seen = train(spec, trial.key)
    model = build_model(spec, trial, load_dataset("digits", seed=0))
    model.load_state_dict(seen[-1][1]["model"])
    latent = [m.weight for m in model.modules()
              if isinstance(m, QUANTIZED_LAYERS) and m.weight_quantizer is not None
              and m.weight_quantizer.clip_weights == (-1.0, 1.0)]
    assert latent
    assert max(w.abs().max().item() for w in latent) == 1.0  # reached the bound, never beyond it


def test_evaluate_runs_in_eval_mode():
    """evaluate() uses the running BatchNorm statistics and hard quantizers, and changes no buffer,
    whatever mode the model was left in."""
    spec = make_spec(estimators=["aqe"], include_full_precision=False)
    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = build_model(spec, trial_of(spec, "aqe-w1a1-s0"), data)
    model.train()
    for xb, _ in data.loader("train", 64):  # running statistics away from their initial 0 / 1
        model(xb)
    before = copy.deepcopy(model.state_dict())
    model.train()
    got = evaluate(model, data.loader("test", 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        want = (model(data.test_x).argmax(1) == data.test_y).sum().item() / len(data.test_y)
    assert got == want
    model.train()
    with torch.no_grad():
        in_train_mode = [(model(xb).argmax(1) == yb).sum().item() for xb, yb in data.loader("test", 64)]
    assert sum(in_train_mode) / len(data.test_y) != want  # the modes do differ here


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


def test_top5_is_reported_from_six_classes():
    spec = make_spec(dataset="synthetic", model="digits_net", epochs=1, include_full_precision=False,
                     estimators=["ste"], dataset_options={"shape": [1, 8, 8], "num_classes": 6, "n_train": 64,
                                                          "n_val": 16, "n_test": 32})
    final, seen = train(spec, "ste-w1a1-s0")
    assert 0 <= seen[0][0]["test_top5"] <= 1 and final["final_test_top5"] == seen[0][0]["test_top5"]


@pytest.mark.parametrize("classes", [3, 5])
def test_top5_is_not_reported_with_fewer_than_six_classes(classes):
    """Nor taken (torch's top-5 of fewer than five logits fails): AQE's val_acc_soft is top-1 only too."""
    spec = make_spec(dataset="synthetic", model="digits_net", epochs=1, include_full_precision=False,
                     estimators=["aqe"], dataset_options={"shape": [1, 8, 8], "num_classes": classes, "n_train": 64,
                                                          "n_val": 16, "n_test": 32})
    final, seen = train(spec, "aqe-w1a1-s0")
    assert seen[0][0]["test_top5"] is None and final["final_test_top5"] is None
    assert seen[0][0]["test_acc"] is not None and seen[0][0]["val_acc_soft"] is not None

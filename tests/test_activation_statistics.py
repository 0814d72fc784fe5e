"""Activation statistics of the MINW quantizers (``act_stats``): per sample, per batch, running.

Each mode's forward values are checked against thresholds composed here by hand (Δ = 0.7·mean|x|,
powers-of-two edges t_j·max|x| over the sample, the batch, or a momentum average of batches), its
gradient against the estimator's formula (no gradient flows through the statistic), and the
running estimate's life cycle: updated in training, frozen in eval, carried by the state dict.
"""
import pytest
import torch

import estimators as E
from estimators.minw import DEFAULT_ACT_MOMENTUM

MODES = ["per_sample", "per_batch", "running"]
THRESHOLDS_3BIT = (0.02, 0.07, 0.14)


def ternary_ref(x, s):
    """0 if |x| ≤ 0.7·s else sign(x), s broadcastable."""
    return torch.where(x.abs() > 0.7 * s, torch.where(x >= 0, 1.0, -1.0).to(x.dtype), torch.zeros_like(x))


def pow2_ref(x, m):
    """3-bit staircase on |x|/m: < .02 → 0, < .07 → ¼, < .14 → ½, else 1."""
    r = x.abs() / m
    mag = torch.where(r < 0.02, 0.0, torch.where(r < 0.07, 0.25, torch.where(r < 0.14, 0.5, 1.0))).to(x.dtype)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype) * mag


def stat_ref(x, bits, mode, running=None):
    """mean|x| (2 bits) or max|x| (3 bits): per sample (keepdim), per batch, or the given running value."""
    if mode == "running":
        return running
    red = (lambda t, **k: t.abs().mean(**k)) if bits == 2 else (lambda t, **k: t.abs().amax(**k))
    return red(x, dim=tuple(range(1, x.dim())), keepdim=True) if mode == "per_sample" else red(x)


def q_ref(x, bits, s):
    return ternary_ref(x, s) if bits == 2 else pow2_ref(x, s)


def batches(n=4, seed=0, dtype=torch.float64):
    """Batches whose scale differs, so that per-batch and running statistics differ from per-sample ones."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(5, 3, 4, 4, generator=g, dtype=dtype) * 2 - 1) * (0.3 + 0.2 * i)
            * torch.linspace(0.2, 1.0, 5, dtype=dtype).view(5, 1, 1, 1) for i in range(n)]


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("mode", MODES)
def test_forward_of_each_mode_matches_composed_thresholds(mode, bits):
    """Train: AQE's α·Q(x) + (1 − α)·x and STE's Q(x) with each mode's statistic; eval: Q(x) alone, with the
    running estimate frozen at s_r ← (1 − m)·s_r + m·s_batch over the training batches (s_r = s_1 at first)."""
    aqe = E.create_estimator("aqe", bits=bits, role="activation", act_stats=mode).double()
    ste = E.create_estimator("ste", bits=bits, role="activation", act_stats=mode).double()
    aqe.set_progress(3, 10)
    alpha, m = 0.5 * 2**0.3, DEFAULT_ACT_MOMENTUM
    running = None
    for x in batches():
        batch = stat_ref(x, bits, "per_batch")
        running = batch if running is None else (1 - m) * running + m * batch
        s = stat_ref(x, bits, mode, running)
        torch.testing.assert_close(aqe(x), alpha * q_ref(x, bits, s) + (1 - alpha) * x, rtol=0, atol=1e-12)
        torch.testing.assert_close(ste(x), q_ref(x, bits, s), rtol=0, atol=0)
    x = batches(1, seed=9)[0] * 1.7
    for est in (aqe.eval(), ste.eval()):
        torch.testing.assert_close(est(x), q_ref(x, bits, stat_ref(x, bits, mode, running)), rtol=0, atol=0)


def test_the_modes_quantize_differently():
    """Not a vacuous parametrisation: on these batches the three statistics give three different outputs."""
    x = batches()[2]
    outs = [E.create_estimator("ste", bits=2, role="activation", act_stats=mode)(x) for mode in MODES[:2]]
    assert not torch.equal(outs[0], outs[1])
    run = E.create_estimator("ste", bits=2, role="activation", act_stats="running")
    for b in batches()[:2]:
        run(b)
    assert not torch.equal(run(x), outs[1]) and not torch.equal(run(x), outs[0])


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["aqe", "aqe:alg1", "aqe:autodiff", "ste", "clipped_ste", "xnor"])
def test_gradient_of_each_mode_is_the_estimators_formula(case, mode, bits):
    name, _, backward = case.partition(":")
    params = {"backward": backward} if backward else {}
    est = E.create_estimator(name, bits=bits, role="activation", act_stats=mode, **params)
    est.set_progress(3, 10)
    alpha = 0.5 * 2**0.3
    for x in batches(3, seed=bits):
        g = torch.randn_like(x)
        xg = x.clone().requires_grad_(True)
        est(xg).backward(g)
        inside = (x.abs() <= 1).double()
        want = {"aqe": 2 * alpha * g * inside, "aqe:alg1": g * inside, "aqe:autodiff": (1 - alpha) * g,
                "ste": g, "clipped_ste": g * inside, "xnor": g * inside}[case]
        torch.testing.assert_close(xg.grad, want, rtol=0, atol=1e-12)


def test_running_estimate_updates_in_training_and_freezes_in_eval():
    est = E.create_estimator("aqe", bits=2, role="activation", act_stats="running", act_momentum=0.25)
    assert not bool(est.running_stat_set)
    xs = batches()
    est(xs[0])
    assert bool(est.running_stat_set) and est.running_stat.item() == pytest.approx(xs[0].abs().mean().item())
    est(xs[1])
    want = 0.75 * xs[0].abs().mean() + 0.25 * xs[1].abs().mean()
    assert est.running_stat.item() == pytest.approx(want.item(), rel=1e-6)
    est.eval()
    frozen = est.running_stat.clone()
    for x in xs:
        est(x)
    assert torch.equal(est.running_stat, frozen)
    # batch independence: each sample's eval output is the same alone as in any batch
    x = torch.cat(xs)
    together = est(x)
    alone = torch.cat([est(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_per_batch_eval_depends_on_the_batch_and_per_sample_does_not():
    x = torch.cat(batches())
    for mode, independent in (("per_sample", True), ("per_batch", False)):
        est = E.create_estimator("ste", bits=2, role="activation", act_stats=mode).eval()
        alone = torch.cat([est(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(est(x), alone) is independent, mode


def test_running_estimate_before_any_training_batch_is_the_batchs_own():
    est = E.create_estimator("ste", bits=3, role="activation", act_stats="running").eval()
    x = batches()[1]
    assert torch.equal(est(x), pow2_ref(x, x.abs().amax()))
    assert not bool(est.running_stat_set)


def test_weights_and_statistic_free_quantizers_have_no_running_buffer():
    assert "running_stat" not in dict(E.create_estimator("aqe", bits=2, role="weight", act_stats="running")
                                      .named_buffers())
    for bits, grid in ((1, "minw"), (2, "uniform")):
        est = E.create_estimator("aqe", bits=bits, role="activation", act_stats="running", grid=grid)
        assert not dict(est.named_buffers())
    w = torch.randn(4, 3, 3, 3)
    est = E.create_estimator("ste", bits=2, role="weight", act_stats="per_sample")  # weights: per tensor always
    assert torch.equal(est(w), ternary_ref(w, w.abs().mean()))


def _model(mode):
    from workers.models import create_model

    torch.manual_seed(0)
    return create_model("digits_net", num_classes=10, input_shape=(1, 8, 8), w_bits=2, a_bits=2, estimator="aqe",
                        estimator_params={"act_stats": mode})


def test_state_dict_round_trip_and_old_checkpoints():
    model = _model("running")
    keys = [k for k in model.state_dict() if k.endswith("running_stat")]
    assert len(keys) == 3  # digits_net: the three layers with a quantized input (the first conv's image stays float)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(20, 1, 8, 8)
    want = model(x)
    state = model.state_dict()
    copy = _model("running")
    copy.load_state_dict(state)  # strict
    copy.eval()
    assert torch.equal(copy(x), want)
    # a checkpoint from before act_stats=running (no buffers) loads strictly and leaves the estimate unset
    old = {k: v for k, v in _model("per_sample").state_dict().items()}
    fresh = _model("running")
    fresh.load_state_dict(old)
    assert not any(bool(v) for k, v in fresh.state_dict().items() if k.endswith("running_stat_set"))
    fresh.train()
    fresh(torch.randn(16, 1, 8, 8))
    assert all(bool(v) for k, v in fresh.state_dict().items() if k.endswith("running_stat_set"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_estimate_follows_the_models_dtype(dtype):
    est = E.create_estimator("aqe", bits=3, role="activation", act_stats="running").to(dtype)
    x = batches(1, dtype=dtype)[0]
    y = est(x)
    assert y.dtype == dtype and est.running_stat.dtype == dtype


def test_default_is_running_and_only_per_batch_declines_a_packed_encoding():
    """docs/results/activation_statistics chose the running estimate (protocol v2); the packed engine runs it as the
    layer's constant. Per-batch statistics (a prediction depends on its batch) declare no packed encoding."""
    for name in ("aqe", "ste", "clipped_ste", "approx_sign", "ede", "reste", "xnor"):
        assert E.create_estimator(name, bits=2, role="activation").act_stats == "running"
        for stats in ("running", "per_sample"):
            assert E.create_estimator(name, bits=2, role="activation", act_stats=stats).packed_encoding() == "ternary"
            assert E.create_estimator(name, bits=3, role="activation", act_stats=stats).packed_encoding() == "pow2"
        assert E.create_estimator(name, bits=2, role="activation", act_stats="per_batch").packed_encoding() is None
        assert E.create_estimator(name, bits=1, role="activation", act_stats="per_batch").packed_encoding() == "sign"
        assert E.create_estimator(name, bits=2, role="weight").act_stats is None  # weights: per tensor

def images(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 8, 8, generator=g) * (0.5 + 0.5 * i) for i in range(n)]


def _buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point and "running" in k}


def test_the_training_forward_measured_on_validation_data_updates_no_running_statistic():
    """val_acc_soft runs AQE's training forward on validation images: the running estimate (and BatchNorm's)
    must not learn from them."""
    model = _model("running")
    E.calibrate_activation_stats(model, images(2))
    before = _buffers(model)
    with E.training_forward(model) as differs, torch.no_grad():
        assert differs
        model(torch.randn(32, 1, 8, 8) * 3)
    after = _buffers(model)
    assert before.keys() == after.keys() and any(k.endswith("running_stat") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.train()  # and training updates it again
    model(torch.randn(32, 1, 8, 8) * 3)
    assert not torch.equal(_buffers(model)["features.1.0.input_quantizer.quantizer.running_stat"],
                           before["features.1.0.input_quantizer.quantizer.running_stat"])


def test_calibration_sets_the_running_statistics_and_leaves_batchnorm_alone():
    """calibrate_activation_stats: the running estimate is the momentum average of the batches' statistic,
    BatchNorm's running mean and variance are unchanged, the model ends in eval mode."""
    model = _model("running")
    xs = images(3)
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k or "running_var" in k}
    quantizers = [m for m in model.modules() if getattr(m, "tracks_running_stat", False)]
    assert quantizers and not any(bool(q.running_stat_set) for q in quantizers)
    E.calibrate_activation_stats(model, xs)
    assert not model.training and all(bool(q.running_stat_set) for q in quantizers)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn.items())
    first = quantizers[0]  # the first quantized layer's input is a fixed function of x: check the average
    seen = []
    hook = first.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().mean()))
    model.train()
    with torch.no_grad():
        for x in xs:
            first.frozen_stats = True
            model(x)
    first.frozen_stats = False
    hook.remove()
    want = seen[0]
    for s in seen[1:]:
        want = (1 - DEFAULT_ACT_MOMENTUM) * want + DEFAULT_ACT_MOMENTUM * s
    assert torch.allclose(first.running_stat, want.to(first.running_stat.dtype), rtol=1e-6)

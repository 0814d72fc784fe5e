"""The MINW-Net quantizers' fast paths (sign, ternary, powers of two) against the compositions they replaced.

``Qz.ternary_composed`` / ``Qz.pow2_composed`` and ``ones_like(x).copysign_(x)`` are the quantizers as they
were; ``reference`` below is the previous ``MinwEstimator.forward`` built on them (the running statistic
tracked, then the batch's statistic taken again inside a ``where``; ``where`` / ``bucketize`` quantizers;
``hardtanh_backward``-free pseudo-gradients). The fast path must give the same forward values bit for bit
(the sign of zero and NaN included), equal gradients (bit for bit, or to rounding for ``ROUNDED``), and the
same running statistics, in every ``act_stats`` mode, at 1, 2 and 3 bits, for weights and activations.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import estimators as E
from estimators import compiled, fused_ops
from estimators import quantizers as Qz
from estimators.base import surrogate
from estimators.minw import ACT_STATS, MinwEstimator

DTYPES = [torch.float32, torch.float64]
FAMILY = ["ste", "clipped_ste", "aqe", "approx_sign", "ede", "reste", "xnor"]


def as_bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def assert_bit_identical(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(as_bits(got), as_bits(want))


def around(points, dtype, ulps=3):
    """Each point and its ``ulps`` float neighbours on either side, in ``dtype``."""
    p = torch.tensor(points, dtype=dtype)
    out, up, down = [p], p, p
    for _ in range(ulps):
        up, down = torch.nextafter(up, up + 1), torch.nextafter(down, down - 1)
        out += [up, down]
    return torch.cat(out)


def inputs(dtype, seed=0, n=4096, specials=()):
    """Random values in and beyond [−1, 1], ±0, ±1, tiny values and the given special points (both signs)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.tensor(list(specials), dtype=dtype) if len(specials) else torch.zeros(0, dtype=dtype)
    x = torch.cat([
        torch.rand(n // 2, dtype=dtype, generator=g) * 3 - 1.5,
        torch.randn(n // 2, dtype=dtype, generator=g) * 0.3,
        s, -s,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30], dtype=dtype),
    ])
    x = x[torch.randperm(x.numel(), generator=g)]
    return x[: x.numel() // 8 * 8].reshape(8, -1)


# -- the quantizers -----------------------------------------------------------------------------
def old_sign(x):
    return torch.ones_like(x).copysign_(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_is_the_old_sign(dtype):
    x = inputs(dtype)
    x[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    x[1, :1] = -torch.tensor(float("nan"))
    assert_bit_identical(Qz.sign(x), old_sign(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [None, "sample"])
def test_ternary_is_bit_identical_at_and_around_the_threshold(dtype, dims):
    stat = torch.tensor(0.37, dtype=dtype)
    delta = float(0.7 * stat)  # Δ as ternary computes it, and its neighbours, in x
    x = inputs(dtype, specials=around([delta, 0.37], dtype).tolist())
    for kwargs in ({"dims": dims}, {"mean_abs": stat}, {"mean_abs": torch.full((8, 1), 0.37, dtype=dtype)}):
        y = Qz.ternary(x, 0.7, **kwargs)
        assert_bit_identical(y, Qz.ternary_composed(x, 0.7, **kwargs))
    y = Qz.ternary(x, 0.7, mean_abs=stat)
    assert y.abs().eq(1).any() and y.eq(0).any()  # both regimes, at the threshold itself too
    assert (x.abs() == delta).any() and torch.equal(y[x.abs() == delta], torch.zeros_like(y[x.abs() == delta]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dims", [None, "sample"])
def test_pow2_is_bit_identical_at_and_around_every_edge(dtype, bits, dims):
    m = torch.tensor(1.3, dtype=dtype)
    t = Qz.pow2_thresholds(bits)
    x = inputs(dtype, specials=around([e * 1.3 for e in t] + [1.3], dtype, ulps=4).tolist())
    for kwargs in ({"dims": dims}, {"max_abs": m}, {"max_abs": torch.full((8, 1), 1.3, dtype=dtype)}):
        assert_bit_identical(Qz.pow2(x, bits, **kwargs), Qz.pow2_composed(x, bits, **kwargs))
    y = Qz.pow2(x, bits, max_abs=m)
    assert set(y.abs().unique().tolist()) == set(Qz.levels("pow2", bits).abs().tolist())  # every level reached
    assert (y == -0.0).any() and (as_bits(y) != as_bits(y.abs())).any()  # −0 kept for negative x below t_0


def test_pow2_custom_thresholds_and_many_levels_match():
    x = inputs(torch.float32, seed=3)
    for bits, t in ((3, (0.05, 0.2, 0.5)), (5, None), (8, None)):  # 5 and 8 bits: more levels than the staircase
        assert_bit_identical(Qz.pow2(x, bits, t), Qz.pow2_composed(x, bits, t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_infinite_and_degenerate_statistics(dtype):
    """NaN and ±inf in x, and a statistic that is NaN, infinite, zero or subnormal: the same values."""
    x = inputs(dtype, seed=1)
    x[0, :6] = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    stats = [None, 0.0, 5e-45 if dtype == torch.float32 else 5e-324, float("inf"), float("nan"), 0.25]
    for s in stats:
        st = None if s is None else torch.tensor(s, dtype=dtype)
        assert_bit_identical(Qz.ternary(x, 0.7, mean_abs=st), Qz.ternary_composed(x, 0.7, mean_abs=st))
        assert_bit_identical(Qz.pow2(x, 3, max_abs=st), Qz.pow2_composed(x, 3, max_abs=st))
    for dims in (None, "sample"):
        assert_bit_identical(Qz.ternary(x, 0.7, dims), Qz.ternary_composed(x, 0.7, dims))
        assert_bit_identical(Qz.pow2(x, 3, dims=dims), Qz.pow2_composed(x, 3, dims=dims))
    assert_bit_identical(Qz.ternary(x, 0.0), Qz.ternary_composed(x, 0.0))  # Δ = 0: every non-zero is ±1


def test_a_statistic_of_a_larger_shape_broadcasts_as_before():
    """A statistic with more dimensions than x, or as many but a larger one (2 rows for x's 1), enlarges the
    output as the composition does (the fast paths, which write in place, must not take it)."""
    s = torch.tensor([[0.3], [0.5]])
    for x in (inputs(torch.float32)[0], inputs(torch.float32)[:1]):
        ternary, pow2 = Qz.ternary(x, 0.7, mean_abs=s), Qz.pow2(x, 3, max_abs=s)
        assert ternary.shape == pow2.shape == (2, x.shape[-1])
        assert_bit_identical(ternary, Qz.ternary_composed(x, 0.7, mean_abs=s))
        assert_bit_identical(pow2, Qz.pow2_composed(x, 3, max_abs=s))
    x, s = inputs(torch.float32)[0, :3].reshape(3, 1), torch.tensor([0.3, 0.5])  # (2,) against x's (3, 1)
    ternary, pow2 = Qz.ternary(x, 0.7, mean_abs=s), Qz.pow2(x, 3, max_abs=s)
    assert ternary.shape == pow2.shape == (3, 2)
    assert_bit_identical(ternary, Qz.ternary_composed(x, 0.7, mean_abs=s))
    assert_bit_identical(pow2, Qz.pow2_composed(x, 3, max_abs=s))


def test_a_wrong_threshold_would_be_caught():
    """Guard: moving the pow2 edges by one float, or ternary's Δ by one float, changes values of these inputs."""
    m = torch.tensor(1.3)
    t = Qz.POW2_THRESHOLDS_3BIT
    x = inputs(torch.float32, specials=around([e * 1.3 for e in t], torch.float32).tolist())
    moved = torch.nextafter(torch.tensor(t), torch.tensor(1.0)).tolist()
    assert not torch.equal(Qz.pow2_composed(x, 3, max_abs=m), Qz.pow2_composed(x, 3, moved, max_abs=m))
    delta = torch.tensor(float(0.7 * torch.tensor(0.37)))
    x = inputs(torch.float32, specials=around([float(delta)], torch.float32).tolist())
    assert not torch.equal(Qz.ternary_at(x, float(delta)), Qz.ternary_at(x, float(torch.nextafter(delta, delta + 1))))


# -- the estimators: the previous forward, composed ------------------------------------------------
def composed_quantize(est, x, stat):
    q, h = est.quantizer, est.hparams
    if q == "sign":
        return old_sign(x)
    if q == "ternary":
        return Qz.ternary_composed(x, h["delta_ratio"], dims=est._dims, mean_abs=stat)
    if q == "pow2":
        return Qz.pow2_composed(x, est.bits, h["pow2_thresholds"], dims=est._dims, max_abs=stat)
    return Qz.uniform(x, est.bits, signed=q == "uniform_signed")


def composed_clipped_grad(x, g):
    return g * (x.abs() <= 1).to(x.dtype)


def reference(est, x):
    """The previous MinwEstimator.forward: track, then the statistic through a ``where`` that takes the
    batch's again, the composed quantizer, and each estimator's pseudo-gradient."""
    stat = None
    if est.tracks_running_stat:
        if est.training and not est.frozen_stats:
            with torch.no_grad():
                batch = est.batch_stat(x.detach()).to(est.running_stat.dtype)
                m = est.hparams["act_momentum"]
                est.running_stat.copy_(torch.where(est.running_stat_set, est.running_stat.lerp(batch, m), batch))
                est.running_stat_set.fill_(True)
        stat = torch.where(est.running_stat_set, est.running_stat.to(x.dtype), est.batch_stat(x.detach()))

    def quantize(t):
        return composed_quantize(est, t, stat)

    name = est.name
    composed_grads = {"approx_sign": approx_sign_grad, "reste": reste_grad_of(est), "ede": ede_grad_of(est)}
    if not est.training:
        if name == "xnor" and est.role == "weight":
            return quantize(x) * est.scale(x)
        return quantize(x)
    if name == "ste":
        return surrogate(x, quantize, None)
    if name == "aqe":
        a = est.alpha
        grad = {"eq18": lambda t, g: composed_clipped_grad(t, g) * (2 * a), "alg1": composed_clipped_grad,
                "autodiff": lambda t, g: g * (1.0 - a)}[est.hparams["backward"]]
        return surrogate(x, lambda t: torch.lerp(t, quantize(t), a), grad)
    if name == "xnor" and est.role == "weight":
        alpha = E.xnor.filter_mean_abs(x.detach())
        n = x[0].numel()
        return surrogate(x, lambda t: quantize(t) * alpha,
                         lambda t, g: g * ((t.abs() <= 1).to(t.dtype) * alpha + 1.0 / n))
    if name in ("clipped_ste", "xnor"):
        return surrogate(x, quantize, composed_clipped_grad)
    return surrogate(x, quantize, composed_grads[name])


def approx_sign_grad(x, g):
    return g * (2 - 2 * x.abs()).clamp_min(0)


def ede_grad_of(est):
    def grad(x, g):
        t, k = est.t, est.k
        return g * k * t * (1 - torch.tanh(t * x) ** 2)

    return grad


def reste_grad_of(est):
    def grad(x, g):
        o, t, eps = est.o, est.hparams["t"], est.hparams["eps"]
        a = x.abs()
        slope = (1 / o) * a.clamp_min(eps).pow((1 - o) / o)
        slope = torch.where(a <= eps, eps ** (1 / o) / eps, slope)
        return g * slope * (a <= t).to(x.dtype)

    return grad


def make(name, bits, role, mode, dtype, **params):
    if role == "activation":
        params["act_stats"] = mode
    est = E.create_estimator(name, bits=bits, role=role, **params).to(dtype).train()
    est.set_progress(3, 10)  # α, t, o away from their starting values
    return est


def step(est, fn, x, g):
    xg = x.clone().requires_grad_(True)
    y = fn(est, xg)
    if est.training:
        y.backward(g)
    return y.detach(), xg.grad


#: Pseudo-gradients computed by another formula, equal in exact arithmetic: EDE's k·t·(1 − tanh²(t·x)) as
#: 4·k·t·σ(−2t|x|)·(1 − σ(−2t|x|)), ReSTE's chord slope as max(|x|, ε)^((1−o)/o) and the rest without a
#: boolean mask. They agree with the composed formulas to float rounding, not bit for bit.
ROUNDED = {"ede", "reste"}


def assert_gradients_equal(name, got, want):
    """Bit for bit, or for :data:`ROUNDED` within 4 units of the dtype's epsilon, relative to each value and
    to the largest (EDE's 1 − tanh² cancels in its tails, where the old formula's error was that large)."""
    if name not in ROUNDED or got is None:
        assert (got is None and want is None) or torch.equal(got, want)
        return
    eps = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=4 * eps * want.abs().max().item())
    assert not torch.equal(got, want) or want.abs().max() == 0  # these really are computed another way


def check_steps(est, xs, g):
    """Train both copies on the batches xs, then evaluate on each: the same values, gradients and statistics."""
    ref = copy.deepcopy(est)
    for x in xs:
        y1, gx1 = step(est, lambda e, t: e(t), x, g)
        y0, gx0 = step(ref, reference, x, g)
        assert_bit_identical(y1, y0)
        assert_gradients_equal(est.name, gx1, gx0)
    got, want = est.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert ("running_stat" in want) == est.tracks_running_stat
    est.eval(), ref.eval()
    for x in xs:
        assert_bit_identical(step(est, lambda e, t: e(t), x, g)[0], step(ref, reference, x, g)[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ACT_STATS)
@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("name", FAMILY)
def test_activation_forward_bit_identical_and_gradients_equal(name, bits, mode, dtype):
    est = make(name, bits, "activation", mode, dtype)
    xs = [inputs(dtype, seed=s) * (1 + 0.3 * s) for s in range(3)]  # statistics that move from batch to batch
    g = torch.randn(xs[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    check_steps(est, xs, g)
    if bits > 1:  # the values are on both sides of Q's thresholds
        y = est(xs[0])
        assert (y == 0).any() and (y.abs() == 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("name", FAMILY)
def test_weight_forward_bit_identical_and_gradients_equal(name, bits, dtype):
    est = make(name, bits, "weight", None, dtype)
    w = inputs(dtype, seed=bits).clamp(-1, 1).reshape(8, 4, -1)  # latent weights, clipped
    g = torch.randn(w.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    check_steps(est, [w], g)


@pytest.mark.parametrize("backward", ["eq18", "alg1", "autodiff"])
@pytest.mark.parametrize("bits", [2, 3])
def test_aqe_backward_rules(backward, bits):
    est = make("aqe", bits, "activation", "running", torch.float64, backward=backward)
    xs = [inputs(torch.float64, seed=s) for s in range(2)]
    g = torch.randn(xs[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_steps(est, xs, g)


def test_the_batch_statistic_is_taken_once_per_training_forward(monkeypatch):
    """act_stats=running: one |x| reduction per training forward (it was two: track, then the ``where``);
    none in eval once the estimate is set."""
    est = make("ste", 2, "activation", "running", torch.float32)
    calls = []
    real = type(est).batch_stat
    monkeypatch.setattr(type(est), "batch_stat", lambda self, x: calls.append(1) or real(self, x))
    x = inputs(torch.float32)
    est(x)
    assert len(calls) == 1
    est.eval()(x)
    assert len(calls) == 1


@pytest.mark.parametrize("name", ["ste", "aqe"])
def test_one_thread_or_two_give_the_same_values(name, monkeypatch):
    """The quantizers are elementwise once the statistic is taken: the thread count cannot change them."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        for bits in (1, 2, 3):
            est = make(name, bits, "activation", "per_batch", torch.float32)
            out = []
            for limit in (0, x.numel()):
                monkeypatch.setattr(fused_ops, "SERIAL_NUMEL", limit)
                out.append(step(est, lambda e, t: e(t), x, g))
            assert_bit_identical(out[0][0], out[1][0])
            assert torch.equal(out[0][1], out[1][1])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_quantizer_values_of_a_training_network_stay_on_the_levels():
    """A QConv2d step at W3A3 with the default statistics: outputs of Q lie exactly on the pow2 levels."""
    layer = E.QConv2d(4, 4, 3, padding=1, w_bits=3, a_bits=3, estimator="ste")
    x = torch.randn(2, 4, 6, 6).clamp(-1, 1)
    q = layer.input_quantizer.quantizer
    y = q(x)
    levels = set(Qz.levels("pow2", 3).tolist())
    assert set(y.unique().tolist()) <= levels and not math.isnan(float(q.running_stat))


@pytest.mark.parametrize("name, params", [("clipped_ste", {}), ("aqe", {"backward": "eq18"}),
                                          ("aqe", {"backward": "alg1"}), ("xnor", {})])
@pytest.mark.parametrize("bits", [1, 2])
def test_inputs_inside_or_just_outside_the_unit_interval(name, params, bits):
    """All of x in [−1, 1] (a HardTanh output): the mask is skipped, with the same gradient; one value a float
    beyond 1 (or a NaN) makes the masked path run: still the same gradient."""
    dtype = torch.float32
    one = torch.tensor(1.0)
    edge = [1.0, -1.0, float(torch.nextafter(one, -one)), float(-torch.nextafter(one, -one))]
    inside = inputs(dtype, specials=edge).clamp(-1, 1)
    g = torch.randn(inside.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    above = inside.clone()
    above[3, 5] = float(torch.nextafter(one, one + 1))
    for x in (inside, above):
        check_steps(make(name, bits, "activation", "running", dtype, **params), [x], g)
    est = make(name, bits, "activation", "running", dtype, **params)
    _, gx = step(est, lambda e, t: e(t), above, g)
    at_one = above.abs() == 1
    assert gx[3, 5] == 0 and at_one.any() and (gx[at_one] != 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_fast_paths_match_the_composed_reference():
    """Every fast path on a CUDA device: the same values, gradients and statistics as the composed reference
    there (each estimator at 1, 2 and 3 bits, for weights and in every activation-statistics mode)."""
    failures = []
    for name in FAMILY:
        for bits in (1, 2, 3):
            for role, mode in [("weight", None)] + [("activation", m) for m in ACT_STATS]:
                est = make(name, bits, role, mode, torch.float32).cuda()
                xs = [(inputs(torch.float32, seed=s) * (1 + 0.3 * s)).cuda() for s in range(2)]
                if role == "weight":
                    xs = [x.clamp(-1, 1).reshape(8, 4, -1) for x in xs[:1]]
                g = torch.randn(xs[0].shape, generator=torch.Generator().manual_seed(5)).cuda()
                try:
                    check_steps(est, xs, g)
                except AssertionError as e:
                    failures.append(f"{name} W{bits} {role} {mode}: {str(e).splitlines()[0][:200]}")
    assert failures == []


@pytest.mark.parametrize("scale", [None, 0.75])
def test_clipped_grad_of_an_empty_tensor_is_empty(scale):
    """No min/max read of an empty x (it has none): the mask path gives the empty gradient, as for a 1-bit
    estimator's empty batch."""
    from estimators.minw import clipped_grad

    x, g = torch.empty(0, 3), torch.empty(0, 3)
    assert clipped_grad(x, g, scale).shape == (0, 3)
    xg = torch.empty(0, 4, requires_grad=True)
    E.create_estimator("aqe", bits=1).train()(xg).sum().backward()
    assert xg.grad.shape == (0, 4)


def test_from_hardtanh_reads_the_range_off_the_graph():
    """True only for an unmodified HardTanh output whose range lies within the limit."""
    from estimators.minw import from_hardtanh

    leaf = torch.randn(4, 5, requires_grad=True)
    assert from_hardtanh(F.hardtanh(leaf)) and from_hardtanh(torch.nn.Hardtanh(-0.5, 0.5)(leaf))
    assert from_hardtanh(F.hardtanh(leaf, -1.5, 1.5), limit=1.5)
    changed = F.hardtanh(leaf)
    with torch.no_grad():
        changed.mul_(3)  # the graph still says HardTanh; the version says it was changed since
    # HardTanh's gradient (a double backward's node keeps the same range attributes, not the range)
    (its_grad,) = torch.autograd.grad(F.hardtanh(leaf), leaf, torch.full((4, 5), 5.0, requires_grad=True),
                                      create_graph=True)
    assert not any(from_hardtanh(t) for t in (leaf, F.hardtanh(leaf, -2, 2), F.hardtanh(leaf, -1, 2),
                                              F.hardtanh(leaf, -2, 1), changed, F.hardtanh(leaf).view(-1),
                                              torch.relu(leaf), F.hardtanh(leaf).detach(), its_grad))


def test_clipped_grad_of_a_hardtanh_output_still_masks_at_a_smaller_limit():
    """A HardTanh(−1, 1) output vouches for |x| ≤ 1, not for a smaller limit: |x| > limit is zeroed."""
    from estimators.minw import clipped_grad

    x = F.hardtanh(torch.randn(64, 9, requires_grad=True) * 2)
    g = torch.randn(x.shape)
    with torch.no_grad():
        got = clipped_grad(x, g, 0.5, limit=0.5)
    assert torch.equal(got, g * (x.detach().abs() <= 0.5) * 0.5) and (x.abs() > 0.5).any()


def through_hardtanh(est, fn, x, g, low=-1.0, high=1.0):
    leaf = x.clone().requires_grad_(True)
    y = fn(est, F.hardtanh(leaf, low, high))
    y.backward(g)
    return y.detach(), leaf.grad


@pytest.mark.parametrize("name, params", [("clipped_ste", {}), ("aqe", {"backward": "eq18"}),
                                          ("aqe", {"backward": "alg1"}), ("xnor", {}), ("approx_sign", {}),
                                          ("reste", {}), ("ede", {})])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("mode", ["off", "on"])
def test_behind_a_hardtanh_the_mask_is_skipped_without_reading_x(name, params, bits, mode, monkeypatch):
    """A MINW-Net block's activation comes from HardTanh: the estimators' masks 1[|x| ≤ 1] (ReSTE's |x| ≤ t,
    ApproxSign's max(·, 0)) are all ones there, known from the graph (no aminmax), with the composed
    reference's gradient. Saturated inputs (|x| > 1 before the HardTanh) get HardTanh's own zero."""
    dtype = torch.float32
    x = inputs(dtype) * 1.5
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    est = make(name, bits, "activation", "running", dtype, **params)
    ref = copy.deepcopy(est)
    want = through_hardtanh(ref, reference, x, g)
    monkeypatch.setattr(compiled, "MODE", mode)  # on: ReSTE's gradient as one compiled loop

    def no_read(*args, **kwargs):
        raise AssertionError("x was read for its range")

    monkeypatch.setattr(torch, "aminmax", no_read)
    got = through_hardtanh(est, lambda e, t: e(t), x, g)
    assert_bit_identical(got[0], want[0])
    assert_gradients_equal(name, got[1], want[1])
    assert (got[1][x.abs() > 1] == 0).all() and (got[1][x.abs() < 1] != 0).any()


@pytest.mark.parametrize("name", ["clipped_ste", "aqe", "approx_sign"])
def test_behind_a_wider_hardtanh_the_mask_still_applies(name):
    """HardTanh(−2, 2) lets |x| in (1, 2] through: the range is not trusted, the mask zeroes them."""
    dtype = torch.float32
    x = inputs(dtype) * 1.5
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    est = make(name, 1, "activation", "running", dtype)
    want = through_hardtanh(copy.deepcopy(est), reference, x, g, -2.0, 2.0)
    got = through_hardtanh(est, lambda e, t: e(t), x, g, -2.0, 2.0)
    assert_gradients_equal(name, got[1], want[1])
    assert (got[1][x.abs() > 1] == 0).all() and ((x.abs() > 1) & (x.abs() < 2)).any()


def kept_for_backward(est, x):
    """The data pointers of the storages ``est``'s training forward on ``x`` keeps for the backward."""
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = est(x)
    return kept, y


@pytest.mark.parametrize("name, params, keeps_h", [
    ("clipped_ste", {}, False), ("aqe", {"backward": "eq18"}, False), ("aqe", {"backward": "alg1"}, False),
    ("aqe", {"backward": "autodiff"}, False), ("xnor", {}, False), ("ste", {}, False),
    ("approx_sign", {}, True), ("ede", {}, True), ("reste", {}, True)])
def test_behind_a_hardtanh_the_activation_itself_is_not_kept_for_the_backward(name, params, keeps_h):
    """Behind nn.Hardtanh() no MINW estimator keeps x for the backward (as the float network, where the next conv
    keeps its own input): a clipped pseudo-gradient is all ones there, and one that depends on x's values
    (ApproxSign's 2 − 2|x|, EDE's, ReSTE's) is taken from the HardTanh's input h, which its node keeps anyway."""
    est = make(name, 2, "activation", "running", torch.float32, **params)
    h = torch.randn(8, 16, requires_grad=True) * 2
    x = F.hardtanh(h)
    kept, _ = kept_for_backward(est, x)
    assert x.untyped_storage().data_ptr() not in kept
    assert (h.untyped_storage().data_ptr() in kept) is keeps_h
    leaf = torch.randn(8, 16, requires_grad=True)  # no range known from the graph: a masked estimator keeps x
    x = leaf * 1
    kept, _ = kept_for_backward(make(name, 2, "activation", "running", torch.float32, **params), x)
    masked = name != "ste" and params.get("backward") != "autodiff"
    assert kept == ({x.untyped_storage().data_ptr()} if masked else set())


@pytest.mark.parametrize("name", ["approx_sign", "ede", "reste"])
def test_behind_a_narrower_hardtanh_x_is_kept(name):
    """HardTanh(−0.5, 0.5): x = clamp(h, −0.5, 0.5), not clamp(h, −1, 1), so the gradient is not taken from h."""
    est = make(name, 1, "activation", "running", torch.float32)
    x = torch.nn.Hardtanh(-0.5, 0.5)(torch.randn(8, 16, requires_grad=True) * 2)
    kept, _ = kept_for_backward(est, x)
    assert kept == {x.untyped_storage().data_ptr()}


def test_hardtanh_input_is_the_input_of_an_unmodified_unit_hardtanh():
    from estimators.minw import hardtanh_input

    h = torch.randn(4, 5, requires_grad=True)
    got = hardtanh_input(F.hardtanh(h))
    assert got is not None and got.data_ptr() == h.data_ptr() and not got.requires_grad
    changed = F.hardtanh(h)
    with torch.no_grad():
        changed.mul_(0.5)
    assert all(hardtanh_input(t) is None for t in (h, F.hardtanh(h, -0.5, 0.5), F.hardtanh(h, -1, 0.5),
                                                     F.hardtanh(h, -0.5, 1), changed, torch.tanh(h)))


class _SquareGrad(MinwEstimator):
    """A pseudo-gradient g·x² with no form of its own behind a HardTanh (not registered)."""

    name = "square_grad_test"

    def pseudo_grad(self, x, g):
        return g * x * x


def grad_at_hardtanh_output(est, h, g):
    """∂L/∂x at x = HardTanh(h) (not through the HardTanh, which would zero |h| > 1 whatever the estimator
    gave there), with what the estimator kept for the backward."""
    x = F.hardtanh(h.detach().requires_grad_(True))
    kept, y = kept_for_backward(est, x)
    (gx,) = torch.autograd.grad(y, x, g)
    return gx, kept, x


def test_by_default_the_pseudo_gradient_behind_a_hardtanh_is_that_of_the_clamped_input():
    """MinwEstimator.pseudo_grad_behind_hardtanh evaluates the pseudo-gradient at clamp(h, −1, 1) = x."""
    h, g = torch.randn(64, 9) * 2, torch.randn(64, 9)
    got, kept, x = grad_at_hardtanh_output(_SquareGrad(bits=1, role="activation").train(), h, g)
    assert x.untyped_storage().data_ptr() not in kept
    assert torch.equal(got, g * x.detach() * x.detach()) and (h.abs() > 1).any()


@pytest.mark.parametrize("name, params", [("approx_sign", {}), ("ede", {}), ("reste", {}), ("reste", {"t": 0.5})])
@pytest.mark.parametrize("mode", ["off", "on"])
def test_the_gradient_taken_from_the_hardtanh_input_is_the_gradient_at_x(name, params, mode, monkeypatch):
    """At |h| > 1 (x = ±1) too: the gradient w.r.t. x equals the composed reference's at x (ReSTE with t < 1:
    its mask still applies)."""
    h = inputs(torch.float32) * 2
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(4))
    est = make(name, 2, "activation", "running", torch.float32, **params)
    ref = copy.deepcopy(est)
    x = F.hardtanh(h.detach().requires_grad_(True))
    (want,) = torch.autograd.grad(reference(ref, x), x, g)
    monkeypatch.setattr(compiled, "MODE", mode)
    got, kept, x = grad_at_hardtanh_output(est, h, g)
    assert x.untyped_storage().data_ptr() not in kept
    assert_gradients_equal(name, got, want)
    if "t" in params:  # ReSTE's mask |x| ≤ t zeroes what the clamp to ±1 alone would not
        assert (want[h.abs() > params["t"]] == 0).all() and (want[h.abs() < params["t"]] != 0).any()
    elif name != "approx_sign":  # EDE's and ReSTE's gradient at x = ±1 is not zero: the clamp matters there
        assert (want[h.abs() > 1] != 0).any()


@pytest.mark.parametrize("name, params", [("clipped_ste", {}), ("aqe", {"backward": "eq18"}), ("xnor", {})])
def test_a_hardtanh_output_changed_after_the_quantizer_keeps_the_forward_gradient(name, params):
    """The range is asked in the forward, of the x the quantizer saw: changing x in place afterwards (which
    would have failed autograd's check of a kept x) changes neither the output nor the gradient."""
    x = inputs(torch.float32) * 1.5
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    want = through_hardtanh(make(name, 2, "activation", "running", torch.float32, **params), reference, x, g)
    est = make(name, 2, "activation", "running", torch.float32, **params)
    leaf = x.clone().requires_grad_(True)
    h = F.hardtanh(leaf)
    y = est(h)
    with torch.no_grad():
        h.mul_(0.5)
    y.backward(g)
    assert_bit_identical(y.detach(), want[0])
    assert_gradients_equal(name, leaf.grad, want[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_approx_sign_gradient_at_infinities_nan_and_the_ends(dtype):
    """2·(1 − min(|x|, 1))·g from MSE's backward kernel is the composed g·max(2 − 2|x|, 0) bit for bit, also at
    ±∞ (0), NaN (NaN), ±1 (0) and ±0 (2g)."""
    x = torch.tensor([math.inf, -math.inf, math.nan, 1.0, -1.0, 0.0, -0.0, 0.5, -0.75, 3.0], dtype=dtype)
    g = torch.linspace(-2, 2, x.numel(), dtype=dtype)
    got = make("approx_sign", 1, "activation", "running", dtype).pseudo_grad(x, g)
    want = approx_sign_grad(x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got[:3].isfinite().tolist() == [True, True, False] and (got[5:7] == 2 * g[5:7]).all()

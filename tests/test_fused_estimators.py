"""LSQ, PACT, EWGS and DoReFa as fused autograd Functions against the compositions they replaced.

Each reference below is the estimator's previous ``train_forward``, built from the composed
functions the modules keep (``lsq_composed``, ``pact_composed``, ``ewgs_composed``,
``dorefa_*_composed``) and differentiated by autograd. The fused path must give the same forward
values bit for bit (the sign of zero and NaN included), the same input gradient to an ulp or two
(the compositions round g·s/s, ((g/n)·n) and the like), and the same learnable-parameter gradients
to the rounding of a float sum. DSQ's own comparison is tests/test_dsq_fused.py.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import estimators as E
from estimators import fused_ops
from estimators.dorefa import dorefa_activation_composed, dorefa_weight_composed
from estimators.ewgs import ewgs_composed
from estimators.lsq import grad_scale, lsq_composed
from estimators.pact import pact_composed

DTYPES = [torch.float32, torch.float64]
BITS = [1, 2, 3]
ROLES = ["weight", "activation"]
CASES = [(name, role) for name in ("lsq", "pact", "ewgs", "dorefa") for role in ROLES]


def as_bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


# -- the previous train_forward of each estimator ----------------------------------------------
def lsq_reference(est, v):
    est._init_step(v)
    n = v.numel() if est.role == "weight" else v[0].numel()
    s = grad_scale(est.step.to(v.dtype), 1.0 / math.sqrt(n * est.q_p))
    return lsq_composed(v, s, est.q_n, est.q_p, est.bits == 1)


def dorefa_reference(est, x):
    if est.role == "activation":
        return dorefa_activation_composed(x, est.bits)
    if est.bits == 1:  # unchanged: E|W|·sign(W), identity gradient
        return est.train_forward(x)
    return dorefa_weight_composed(x, est.bits)


def pact_reference(est, x):
    if est.role == "weight":
        return dorefa_reference(est, x)
    return pact_composed(x, est.alpha.to(x.dtype), est.bits)


def ewgs_reference(est, x):
    return ewgs_composed(x, est.bits, est.hparams["delta"])


REFERENCES = {"lsq": lsq_reference, "pact": pact_reference, "ewgs": ewgs_reference, "dorefa": dorefa_reference}
FUSED = {"lsq": "LSQFunctionBackward", "pact": "PACTFunctionBackward", "ewgs": "EWGSFunctionBackward",
         "dorefa": "DoReFaActivationBackward"}


def fused_name(name, role, bits):
    if name in ("pact", "dorefa") and role == "weight":
        return None if bits == 1 else "DoReFaWeightBackward"
    return FUSED[name]


def special_points(name, est, dtype):
    """The points where each quantizer's pieces meet (clip edges, rounding edges), for a step/α of 0.3."""
    b = est.bits
    if name == "lsq":
        return [q * 0.3 for q in range(-est.q_n, est.q_p + 1)] + [(q + 0.5) * 0.3 for q in range(-est.q_n, est.q_p)]
    if name == "pact" and est.role == "activation":
        n = 2**b - 1
        return [0.0, 0.3] + [0.3 * j / n for j in range(n + 1)] + [0.3 * (j + 0.5) / n for j in range(n)]
    if name == "dorefa" and est.role == "activation":
        n = 2**b - 1
        return [0.0, 1.0] + [(j + 0.5) / n for j in range(n)]
    n = 2**b - 1  # EWGS and DoReFa weights: the signed uniform grid on [−1, 1]
    return [-1.0, 1.0] + [-1 + 2 * (j + 0.5) / n for j in range(n)]


def inputs(name, est, dtype, seed=0):
    """Random values in and beyond the range, every special point and its two float neighbours, ±0, ±1."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.tensor(special_points(name, est, dtype), dtype=dtype)
    pts = torch.cat([pts, torch.nextafter(pts, pts + 1), torch.nextafter(pts, pts - 1)])
    x = torch.cat([
        torch.rand(2000, dtype=dtype, generator=g) * 3 - 1.5,
        torch.randn(1000, dtype=dtype, generator=g) * 0.3,
        pts,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 5.0, -7.0, 1e-30, -1e-30], dtype=dtype),
    ])
    x = x[torch.randperm(x.numel(), generator=g)]
    return x[: x.numel() // 4 * 4].reshape(4, -1)


def make(name, role, bits, dtype):
    est = E.create_estimator(name, bits=bits, role=role).to(dtype).train()
    with torch.no_grad():
        if name == "lsq":  # a set step: the special points above are its multiples
            est.step.fill_(0.3)
            est.initialized.fill_(True)
        if name == "pact" and role == "activation":
            est.alpha.fill_(0.3)
    return est


def run(est, fn, x, g):
    """Output, ∂/∂x and the gradient of each learnable parameter, with fresh parameter gradients."""
    est.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    y = fn(est, xg)
    y.backward(g)
    return y, xg.grad, {k: p.grad.clone() for k, p in est.named_parameters() if p.grad is not None}


def fused(est, x):
    return est(x)


def param_grad_scale(name, est, x, g):
    """Σ of |each element's term| in the learnable parameter's gradient (float64): what its float sum
    can round against. LSQ: c·|g|·(|round u| + |u|); PACT: |g| (the terms of Σ g·1[x ≥ α])."""
    x, g = x.double(), g.double()
    if name == "lsq":
        s = float(est.step.detach())
        n = x.numel() if est.role == "weight" else x[0].numel()
        u = x / s
        return float((g.abs() * (u.clamp(-est.q_n, est.q_p).round().abs() + u.abs())).sum()) / math.sqrt(n * est.q_p)
    return float(g.abs().sum())


def param_grad_tol(name, est, x, g):
    """Rounding-level agreement of two float sums: eps times the size of the terms they add."""
    return (1e-6 if x.dtype == torch.float32 else 1e-14) * param_grad_scale(name, est, x, g)


def assert_param_grads_close(got, want, name, est, x, g):
    assert got.keys() == want.keys()
    tol = param_grad_tol(name, est, x, g)
    for k in want:
        assert abs(float(got[k]) - float(want[k])) <= tol, (k, float(got[k]), float(want[k]), tol)


def tight(dtype):
    return dict(rtol=5e-7, atol=0.0) if dtype == torch.float32 else dict(rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name, role", CASES)
def test_fused_forward_is_bit_identical_and_gradients_equal(name, role, bits, dtype):
    est = make(name, role, bits, dtype)
    x = inputs(name, est, dtype, seed=bits)
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(7))
    y1, gx1, gp1 = run(est, fused, x, g)
    y0, gx0, gp0 = run(est, REFERENCES[name], x, g)
    want = fused_name(name, role, bits)
    assert (type(y1.grad_fn).__name__ if want else None) == want
    assert y1.dtype == dtype and y1.shape == x.shape
    assert torch.equal(as_bits(y1.detach()), as_bits(y0.detach()))  # the sign of zero included
    assert (gx0 != 0).any()
    if not (name in ("pact", "dorefa") and role == "weight"):  # DoReFa's weights have no clip range
        assert (gx0 == 0).any()  # both regimes: the comparison means something
    assert torch.equal(gx1 == 0, gx0 == 0)
    torch.testing.assert_close(gx1, gx0, **tight(dtype))
    assert_param_grads_close(gp1, gp0, name, est, x, g)
    for k in gp0:  # the tolerance is far below the gradient itself
        assert param_grad_tol(name, est, x, g) < 1e-3 * abs(float(gp0[k]))


@pytest.mark.parametrize("name, role", CASES)
def test_a_zero_upstream_gradient_gives_zero(name, role):
    """Where ∂L/∂y = 0, ∂L/∂x = 0 on both paths (EWGS: sign(0) = 0 scales nothing; no 0·∞)."""
    est = make(name, role, 2, torch.float64)
    x = inputs(name, est, torch.float64)
    x = x[x.isfinite()]
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g[::3] = 0.0
    for fn in (fused, REFERENCES[name]):
        _, gx, _ = run(est, fn, x, g)
        assert torch.equal(gx[::3], torch.zeros_like(gx[::3])), fn


@pytest.mark.parametrize("name, role", CASES)
def test_a_second_derivative_through_a_fused_function_is_refused(name, role):
    """The fused backwards are straight-through rules, not derivatives of the forward: differentiating them again
    raises (``once_differentiable``) instead of giving a number."""
    est = make(name, role, 2, torch.float64)
    x = inputs(name, est, torch.float64).requires_grad_(True)
    y = est(x)
    assert type(y.grad_fn).__name__ == fused_name(name, role, 2)
    g = torch.ones_like(y, requires_grad=True)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("name, role", CASES)
def test_eval_and_no_grad_give_the_training_values(name, role):
    """The hard quantizer (eval) and a no-grad training forward return the fused forward's values."""
    for bits in (2, 3):
        est = make(name, role, bits, torch.float32)
        x = inputs(name, est, torch.float32, seed=11)
        y = est(x)
        with torch.no_grad():
            y_ng = est(x)
        assert y_ng.grad_fn is None and torch.equal(as_bits(y_ng), as_bits(y.detach()))
        if name != "ewgs":  # EWGS's eval is Qz.uniform, the same values (checked in the test above)
            assert torch.equal(est.eval()(x), y.detach())


def nan_inputs(dtype):
    return torch.tensor([[0.2, float("nan"), -0.7, 1.5], [float("inf"), -float("inf"), 0.05, -0.0]], dtype=dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name, role", CASES)
def test_nan_and_infinite_inputs(name, role, bits):
    """Forward values bit for bit at NaN and ±inf too; gradients equal away from NaN. At NaN inputs
    LSQ and PACT give the composition's gradient as well; EWGS and DoReFa give 0 or g there (HardTanh's
    backward kernel), where their compositions give NaN and 0 — a NaN input makes the loss NaN anyway."""
    dtype = torch.float64
    est = make(name, role, bits, dtype)
    x = nan_inputs(dtype)
    if name in ("pact", "dorefa") and role == "weight":
        x = x.nan_to_num(posinf=0.9, neginf=-0.9)  # weights: tanh normalisation, no NaN by design
    g = torch.arange(1.0, 9.0, dtype=dtype).reshape(2, 4)
    y1, gx1, gp1 = run(est, fused, x, g)
    y0, gx0, gp0 = run(est, REFERENCES[name], x, g)
    assert torch.equal(as_bits(y1.detach()), as_bits(y0.detach()))
    nan = x.isnan()
    torch.testing.assert_close(gx1[~nan], gx0[~nan], rtol=1e-15, atol=0.0)
    if name in ("lsq", "pact"):
        torch.testing.assert_close(gx1, gx0, rtol=1e-15, atol=0.0, equal_nan=True)
        for k in gp0:
            torch.testing.assert_close(gp1[k], gp0[k], rtol=1e-14, atol=1e-14, equal_nan=True)
    else:
        assert all(v == 0 or v == g[nan][i] or math.isnan(v) for i, v in enumerate(gx1[nan].tolist()))


@pytest.mark.parametrize("size", [1, 5, 9, 17, 33])
def test_lsq_nan_input_gets_clamp_s_zero_wherever_it_lies(size):
    """HardTanh's backward kernel gives a NaN x the gradient g in its scalar tail (0 in its vector body): LSQ
    zeroes it as clamp does, wherever the NaN falls, on the step's path and on v's."""
    est = make("lsq", "activation", 2, torch.float64)
    x = torch.linspace(-0.5, 0.5, size, dtype=torch.float64).reshape(1, size)
    x[0, -1] = math.nan
    g = torch.ones_like(x)
    _, gx, gp = run(est, fused, x, g)
    assert gx[0, -1] == 0 and gp["step"].isnan()
    est.step.requires_grad_(False)
    _, gx, _ = run(est, fused, x, g)
    assert gx[0, -1] == 0


def test_lsq_step_that_is_not_positive_falls_back_to_the_composition():
    est = make("lsq", "activation", 2, torch.float64)
    x = inputs("lsq", est, torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    for step in (-0.3, 0.0):
        with torch.no_grad():
            est.step.fill_(step)
        y1, gx1, gp1 = run(est, fused, x, g)
        y0, gx0, gp0 = run(est, lsq_reference, x, g)
        assert type(y1.grad_fn).__name__ != "LSQFunctionBackward"
        assert torch.equal(y1.nan_to_num(), y0.nan_to_num())
        torch.testing.assert_close(gx1, gx0, equal_nan=True)


@pytest.mark.parametrize("alpha", [-0.2, 0.0, math.inf, math.nan])
def test_pact_alpha_that_is_not_positive_falls_back_to_the_composition(alpha):
    """α ≤ 0 or not finite (α = 0 included: the fused forward divides by α) runs the composition."""
    est = make("pact", "activation", 2, torch.float64)
    x = inputs("pact", est, torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    with torch.no_grad():
        est.alpha.fill_(alpha)
    y1, gx1, gp1 = run(est, fused, x, g)
    y0, gx0, gp0 = run(est, pact_reference, x, g)
    assert type(y1.grad_fn).__name__ != "PACTFunctionBackward"
    for got, want in ((y1, y0), (gx1, gx0), (gp1["alpha"], gp0["alpha"])):
        assert torch.equal(as_bits(got), as_bits(want))


@pytest.mark.parametrize("name, role", [("lsq", "activation"), ("lsq", "weight"), ("pact", "activation")])
def test_only_one_input_needs_a_gradient(name, role):
    est = make(name, role, 2, torch.float64)
    x = inputs(name, est, torch.float64, seed=3)
    g = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    # the parameter only (x does not require grad, e.g. a network's first layer)
    est.zero_grad(set_to_none=True)
    est(x).backward(g)
    got = {k: p.grad.clone() for k, p in est.named_parameters()}
    _, _, want = run(est, REFERENCES[name], x, g)
    assert_param_grads_close(got, want, name, est, x, g)
    # x only (the parameter frozen)
    for p in est.parameters():
        p.requires_grad_(False)
    _, gx1, _ = run(est, fused, x, g)
    _, gx0, _ = run(est, REFERENCES[name], x, g)
    torch.testing.assert_close(gx1, gx0, **tight(torch.float64))


def test_a_wrong_gradient_would_be_caught():
    """Guard for the tolerances above: 1 % off in LSQ's step gradient, or 1e-5 in ∂x, fails them."""
    dtype = torch.float32
    est = make("lsq", "activation", 2, dtype)
    x = inputs("lsq", est, dtype, seed=5)
    g = torch.rand(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(5)) + 0.5
    _, gx1, gp1 = run(est, fused, x, g)
    _, gx0, gp0 = run(est, lsq_reference, x, g)
    tol = param_grad_tol("lsq", est, x, g)
    assert abs(float(gp1["step"]) - float(gp0["step"])) <= tol
    assert abs(float(gp1["step"]) * 1.01 - float(gp0["step"])) > tol
    with pytest.raises(AssertionError):
        torch.testing.assert_close(gx1 * (1 + 1e-5), gx0, **tight(dtype))


# -- one intra-op thread for small tensors ------------------------------------------------------
def test_one_thread_runs_small_tensors_alone_and_restores_the_count(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        monkeypatch.setattr(fused_ops, "SERIAL_NUMEL", 100)
        with fused_ops.one_thread(torch.ones(100)):
            seen.append(torch.get_num_threads())
            with fused_ops.all_threads():  # a compute-bound op gets the threads back
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        with fused_ops.all_threads():  # outside one_thread: nothing to give back
            seen.append(torch.get_num_threads())
        with fused_ops.one_thread(torch.ones(101)):
            seen.append(torch.get_num_threads())
        with pytest.raises(RuntimeError), fused_ops.one_thread(torch.ones(3)):
            seen.append(torch.get_num_threads())
            raise RuntimeError("boom")
        torch.set_num_threads(3)  # the limit shrinks as 1/(threads − 1): 50 elements at 3 threads
        for numel in (50, 51):
            with fused_ops.one_thread(torch.ones(numel)):
                seen.append(torch.get_num_threads())
        assert seen == [1, 2, 1, 2, 2, 1, 1, 3] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_the_one_thread_rule_is_off_unless_bitbench_serial_numel_sets_it():
    """Off by default (each trial has its cores); BITBENCH_SERIAL_NUMEL sets the limit for a busy host."""
    code = ("import torch; from estimators import fused_ops as f; torch.set_num_threads(2)\n"
            "with f.one_thread(torch.ones(10)): print(f.SERIAL_NUMEL, torch.get_num_threads())")
    got = {}
    for value in (None, "", "4194304"):
        env = {k: v for k, v in os.environ.items() if k != "BITBENCH_SERIAL_NUMEL"}
        if value is not None:
            env["BITBENCH_SERIAL_NUMEL"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        got[value] = out.stdout.split()
    assert got == {None: ["0", "2"], "": ["0", "2"], "4194304": ["4194304", "1"]}
    assert fused_ops.serial_numel_setting(" 100 ") == 100
    for bad in ("-1", "4Mi", "1.5"):
        with pytest.raises(ValueError, match=f"BITBENCH_SERIAL_NUMEL must be a whole number of elements ≥ 0, "
                                             f"got '{bad}'"):
            fused_ops.serial_numel_setting(bad)


def test_with_the_rule_off_one_thread_keeps_every_thread(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(fused_ops, "SERIAL_NUMEL", 0)
        with fused_ops.one_thread(torch.ones(1)):
            inside = torch.get_num_threads()
        with fused_ops.one_thread(torch.ones(0)):  # not even an empty tensor runs alone
            empty = torch.get_num_threads()
        assert (inside, empty) == (2, 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["lsq", "pact", "ewgs", "dsq"])
def test_one_thread_or_two_give_the_same_values(name, monkeypatch):
    """The forward is elementwise, so the thread count cannot change it; the sums may round differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        est = E.create_estimator(name, bits=2, role="activation")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4096, generator=gen)  # 262,144 elements: split over two threads unless run on one
        g = torch.randn(x.shape, generator=gen)
        out = []
        for limit in (0, x.numel()):
            monkeypatch.setattr(fused_ops, "SERIAL_NUMEL", limit)
            out.append(run(est, fused, x, g))
        (y0, gx0, gp0), (y1, gx1, gp1) = out
        assert torch.equal(y0, y1)
        torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
        for k in gp0:  # float32 sums of 262,144 terms of size ≤ 2|g| (DSQ's α), in two orders
            assert abs(float(gp1[k]) - float(gp0[k])) <= 1e-6 * 2 * float(g.double().abs().sum())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

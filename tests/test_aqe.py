"""AQE (Chen et al. 2020): forward mix, hard eval, schedules, and its STE special case."""
import math

import pytest
import torch

import estimators as E
from estimators import quantizers as Qz


@pytest.mark.parametrize("bits,quantizer", [(1, Qz.sign), (2, Qz.ternary), (3, lambda x: Qz.pow2(x, bits=3))])
def test_training_forward_is_the_convex_mix(bits, quantizer):
    est = E.create_estimator("aqe", bits=bits, role="weight")
    est.set_progress(3, 8)
    a = 0.5 * 2 ** (3 / 8)
    x = torch.randn(200, dtype=torch.float64)
    torch.testing.assert_close(est(x), a * quantizer(x) + (1 - a) * x)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_eval_forward_is_the_hard_quantizer(bits):
    est = E.create_estimator("aqe", bits=bits, role="activation", act_stats="per_sample").eval()
    x = torch.randn(4, 50)
    want = {1: Qz.sign(x), 2: Qz.ternary(x, dims="sample"), 3: Qz.pow2(x, bits=3, dims="sample")}[bits]
    assert torch.equal(est(x), want)


def test_exp_schedule_doubles_from_half_to_one():
    est = E.create_estimator("aqe")
    got = []
    for e in range(0, 11):
        est.set_progress(e, 10)
        got.append(est.alpha)
    assert got == pytest.approx([0.5 * 2 ** (e / 10) for e in range(11)], abs=1e-15)
    assert got[-1] == 1.0  # exactly the quantizer in the last epoch
    assert got[0] == 0.5


def test_linear_and_constant_schedules():
    lin = E.create_estimator("aqe", schedule="linear", alpha_start=0.5, alpha_end=0.9)
    lin.set_progress(5, 10)
    assert lin.alpha == pytest.approx(0.7)
    const = E.create_estimator("aqe", schedule="constant", alpha_start=0.5)
    const.set_progress(9, 10)
    assert const.alpha == 0.5
    assert const.schedule_values() == {"alpha": 0.5}


def test_at_alpha_one_training_output_is_quantized():
    est = E.create_estimator("aqe", bits=1)
    est.set_progress(10, 10)
    x = torch.randn(100)
    assert torch.equal(est(x), Qz.sign(x))


@pytest.mark.parametrize("backward", ["alg1", "eq18"])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_constant_half_alpha_gives_clipped_ste_gradients(backward, bits):
    """Theorem 1 at α = ½: 2α·1[|x|≤1] = 1[|x|≤1], the clipped STE (and Algorithm 1 always is)."""
    aqe = E.create_estimator("aqe", bits=bits, schedule="constant", alpha_start=0.5, backward=backward)
    ste = E.create_estimator("clipped_ste", bits=bits)
    x = torch.randn(3, 64) * 1.5
    g = torch.randn(3, 64)
    grads = []
    for est in (aqe, ste):
        xx = x.clone().requires_grad_(True)
        est(xx).backward(g)
        grads.append(xx.grad)
    assert torch.equal(grads[0], grads[1])


def test_alg1_and_eq18_differ_away_from_half():
    x = torch.linspace(-2, 2, 41).requires_grad_(True)
    est = E.create_estimator("aqe", schedule="constant", alpha_start=0.8)
    est(x).sum().backward()
    assert torch.allclose(x.grad, 1.6 * (x.detach().abs() <= 1).float())


def test_bad_parameters_are_named():
    with pytest.raises(E.UnknownNameError, match="backward='nope' is not allowed; choose one of eq18, alg1, autodiff"):
        E.create_estimator("aqe", backward="nope")
    with pytest.raises(ValueError, match="alpha_start=1.5 is outside"):
        E.create_estimator("aqe", alpha_start=1.5)
    assert math.isclose(E.create_estimator("aqe", alpha_start=0.25).alpha, 0.25)

"""The estimators added for the paper's comparison systems: TWN's scale (xnor scale="twn"), HWGQ and
LQ-Nets. Levels, forward values and the QEM update against hand-computed or independently solved values."""
import itertools
import math

import numpy as np
import pytest
import torch

import estimators as E
from estimators.hwgq import half_normal_levels


# -- TWN's scale ----------------------------------------------------------------------------------
def test_twn_scale_is_mean_abs_above_threshold():
    w = torch.tensor([[0.9, -0.1, 0.4], [-0.6, 0.05, -0.3]])
    # mean|W| = 2.35/6, Δ = 0.7·mean = 0.27417: kept 0.9, 0.4, −0.6, −0.3 → α = 2.2/4 = 0.55
    est = E.create_estimator("xnor", bits=2, role="weight", scale="twn").eval()
    want = torch.tensor([[0.55, 0.0, 0.55], [-0.55, 0.0, -0.55]])
    torch.testing.assert_close(est(w), want)
    torch.testing.assert_close(est.train()(w), want)
    assert float(est.scale(w)) == pytest.approx(0.55)


def test_twn_scale_at_one_bit_is_the_layer_mean_abs_and_default_is_unchanged():
    w = torch.tensor([[0.9, -0.1], [-0.6, 0.2]])
    twn = E.create_estimator("xnor", bits=1, role="weight", scale="twn").eval()
    torch.testing.assert_close(twn(w), torch.tensor([[0.45, -0.45], [-0.45, 0.45]]))  # mean|W| over the layer
    xnor = E.create_estimator("xnor", bits=1, role="weight").eval()  # per filter: 0.5 and 0.4
    torch.testing.assert_close(xnor(w), torch.tensor([[0.5, -0.5], [-0.4, 0.4]]))


def test_twn_scale_leaves_activations_unscaled():
    x = torch.tensor([[0.9, -0.1, 0.4, -0.6]])
    est = E.create_estimator("xnor", bits=2, role="activation", scale="twn").eval()
    assert est.scale(x) is None and set(est(x).unique().tolist()) <= {-1.0, 0.0, 1.0}


# -- HWGQ -----------------------------------------------------------------------------------------
def scipy_lloyd_max(n):
    """The n positive levels minimising the half-normal MSE with nearest-level cells, by a generic
    minimiser over all n levels at once (independent of the Lloyd/Newton code)."""
    from scipy import integrate, optimize, stats

    def distortion(q):
        q = np.sort(q)
        edges = [0.0, *((q[1:] + q[:-1]) / 2), math.inf]
        return sum(integrate.quad(lambda x, c=c: (x - c) ** 2 * 2 * stats.norm.pdf(x), a, b)[0]
                   for c, a, b in zip(q, edges, edges[1:], strict=False))

    res = optimize.minimize(distortion, np.linspace(0.3, 2.0, n), method="L-BFGS-B",
                            options={"ftol": 1e-15, "gtol": 1e-10})
    return np.sort(res.x)


def test_hwgq_levels_match_the_authors_released_configs():
    # zhaoweicai/hwgq configs: 2-bit uniform centers 0.538/1.076/1.614 ("3ne"), non-uniform 0.453/1.51 ("2n")
    assert half_normal_levels(3, "uniform") == pytest.approx((0.538, 1.076, 1.614), abs=2.5e-3)
    assert half_normal_levels(2, "lloyd") == pytest.approx((0.453, 1.51), abs=1e-3)
    assert half_normal_levels(1, "lloyd") == pytest.approx((math.sqrt(2 / math.pi),), abs=1e-12)  # E|x|


@pytest.mark.parametrize("n", [2, 3])
def test_hwgq_lloyd_levels_minimise_the_distortion(n):
    np.testing.assert_allclose(half_normal_levels(n, "lloyd"), scipy_lloyd_max(n), atol=2e-5)


def test_hwgq_lloyd_converges_at_every_supported_width():
    for bits in E.SUPPORTED_BITS:
        for kind in ("uniform", "lloyd"):
            q = half_normal_levels(2**bits - 1, kind)
            assert len(q) == 2**bits - 1 and all(b > a > 0 for a, b in zip(q, q[1:], strict=False))


def test_hwgq_activation_forward_by_hand():
    est = E.create_estimator("hwgq", bits=2, role="activation")
    d = half_normal_levels(3, "uniform")[0]  # Δ = 0.5388; cells (0, 1.5Δ], (1.5Δ, 2.5Δ], (2.5Δ, ∞)
    x = torch.tensor([-1.0, 0.0, 1e-6, 0.8, 1.5 * d + 1e-4, 1.3, 1.4, 5.0], dtype=torch.float64)
    want = [0, 0, d, d, 2 * d, 2 * d, 3 * d, 3 * d]
    torch.testing.assert_close(est.eval()(x), torch.tensor(want, dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(est.train()(x), torch.tensor(want, dtype=torch.float64), atol=1e-7, rtol=0)
    lloyd = E.create_estimator("hwgq", bits=2, role="activation", levels="lloyd").eval()
    assert lloyd(torch.tensor([0.9])).item() == pytest.approx(1.0001060, abs=1e-6)


def test_hwgq_weights_are_bwn():
    w = torch.tensor([[0.9, -0.1], [-0.6, 0.2]])
    hw = E.create_estimator("hwgq", bits=1, role="weight").eval()
    torch.testing.assert_close(hw(w), torch.tensor([[0.5, -0.5], [-0.4, 0.4]]))


# -- LQ-Nets --------------------------------------------------------------------------------------
def all_levels(v, signed):
    codes = np.array(list(itertools.product((-1.0, 1.0) if signed else (0.0, 1.0), repeat=len(v))))
    return codes, codes @ np.asarray(v)


def qem_reference(x, v, signed, momentum=0.9, ridge=1e-4):
    """Brute-force nearest code per input, then ridge least squares and the moving average."""
    codes, levels = all_levels(v, signed)
    b = codes[np.abs(x[:, None] - levels[None, :]).argmin(1)]  # N×K
    k = len(v)
    v_star = np.linalg.solve(b.T @ b + ridge * np.eye(k), b.T @ x + ridge * np.asarray(v))
    return momentum * np.asarray(v) + (1 - momentum) * v_star, levels[np.abs(x[:, None] - levels[None, :]).argmin(1)]


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("role", ["weight", "activation"])
def test_lq_nets_init_forward_and_one_qem_step(bits, role):
    torch.manual_seed(bits)
    x = torch.randn(6, 50, dtype=torch.float64) * 0.7
    est = E.create_estimator("lq_nets", bits=bits, role=role).double()
    sigma = float(x.pow(2).mean().sqrt())
    base = 0.6745 * sigma / 2 ** (bits - 1) if role == "weight" else 0.6745 * 2 * sigma / (2**bits - 1)
    v0 = [base * 2**j for j in range(bits)]
    y = est(x)  # train mode: forward with v0, then one QEM step
    v1, want_y = qem_reference(x.flatten().numpy(), v0, signed=role == "weight")
    np.testing.assert_allclose(y.detach().flatten().numpy(), want_y, atol=1e-12)
    np.testing.assert_allclose(est.basis.numpy(), v1, rtol=1e-10)
    np.testing.assert_allclose(est.level_set().numpy(), np.sort(all_levels(v1, role == "weight")[1]), rtol=1e-10)


def test_lq_nets_qem_converges_to_mean_abs_at_one_bit():
    """K = 1 weights: codes are sign(x) whatever v > 0, so v* = mean|x| (up to the ridge); the moving
    average converges geometrically."""
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    est = E.create_estimator("lq_nets", bits=1, role="weight").double()
    for _ in range(150):  # 0.9^150 ≈ 1e-7
        est(x)
    assert float(est.basis) == pytest.approx(float(x.abs().mean()), rel=1e-5)


def test_lq_nets_qem_lowers_the_quantization_error():
    torch.manual_seed(1)
    x = torch.randn(4000, dtype=torch.float64).relu()
    est = E.create_estimator("lq_nets", bits=2, role="activation").double()
    est(x[:10])  # initialise on a batch, then measure
    def mse() -> float:
        return float((est.hard(x) - x).pow(2).mean())
    before = mse()
    for _ in range(100):
        est(x)
    assert mse() < 0.8 * before


def test_lq_nets_eval_does_not_update_and_state_round_trips():
    torch.manual_seed(2)
    w = torch.randn(8, 4, 3, 3)
    est = E.create_estimator("lq_nets", bits=2, role="weight")
    est(w)
    est(w * 1.5)
    est.eval()
    basis = est.basis.clone()
    out = est(w)
    assert torch.equal(est.basis, basis) and torch.equal(est(w), out)
    fresh = E.create_estimator("lq_nets", bits=2, role="weight").eval()
    fresh.load_state_dict(est.state_dict())
    assert torch.equal(fresh(w), out)


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lq_nets_gradients(bits, dtype):
    torch.manual_seed(bits)
    x = torch.randn(5, 40, dtype=dtype) * 1.2
    g = torch.randn(5, 40, dtype=dtype)
    for role in ("weight", "activation"):
        est = E.create_estimator("lq_nets", bits=bits, role=role).to(dtype)
        est.eval()(x)  # initialise without a QEM step
        v = est.basis.double().numpy().copy()
        xg = x.clone().requires_grad_(True)
        est.train()(xg).backward(g)
        if role == "weight":
            torch.testing.assert_close(xg.grad, g)  # straight through
        else:
            top = np.clip(v, 0, None).sum()  # largest {0,1}-code level
            torch.testing.assert_close(xg.grad, g * ((x > 0) & (x <= top)).to(dtype))

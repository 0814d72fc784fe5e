"""DSQ's fused autograd Function against the autograd composition it replaced.

The reference is the old ``train_forward``: ``soft + (hard - soft).detach()`` built from
:func:`estimators.dsq.dsq_soft` and differentiated by autograd, with α taken through the same
``_alpha`` clamp from an ``nn.Parameter``.
"""
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import estimators as E
from estimators.dsq import DSQFunction, dsq_quantize, dsq_soft

DTYPES = [torch.float32, torch.float64]
BITS = [1, 2, 3]
ALPHAS = [1e-4, 0.05, 0.2, 0.5, 0.9, 0.999]


def reference(x, alpha, bits):
    soft, hard = dsq_soft(x, alpha, bits)
    return soft + (hard - soft).detach()


def as_bits(t):
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def inputs(bits, dtype, seed=0):
    """Random values inside and outside [−1, 1], every interval edge and its two neighbours, ±0, ±1."""
    torch.manual_seed(seed)
    n = 2**bits - 1
    edges = -1 + (2 / n) * torch.arange(n + 1, dtype=dtype)
    mids = -1 + (2 / n) * (torch.arange(n, dtype=dtype) + 0.5)  # where tanh changes sign
    special = torch.cat([edges, mids])
    special = torch.cat([special, torch.nextafter(special, special + 1), torch.nextafter(special, special - 1)])
    x = torch.cat([
        torch.rand(3000, dtype=dtype) * 3 - 1.5,
        torch.randn(1000, dtype=dtype) * 0.3,
        special,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 5.0, -7.0, 1e-30, -1e-30], dtype=dtype),
    ])
    x = x[torch.randperm(x.numel())]
    return x[: x.numel() // 2 * 2].reshape(-1, 2)  # 2-D, so the output keeps a shape


def run(fn, x, alpha_value, bits, g, param_dtype=torch.float32):
    """Output, ∂/∂x and ∂/∂(the nn.Parameter α) through the DSQ estimator's α clamp."""
    est = E.create_estimator("dsq", bits=bits, role="activation").to(param_dtype)
    with torch.no_grad():
        est.alpha.fill_(alpha_value)
    xg = x.clone().requires_grad_(True)
    y = fn(xg, est._alpha(x.dtype), bits)
    y.backward(g)
    return y.detach(), xg.grad, est.alpha.grad


def close_tol(dtype):
    return dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)


def alpha_grad_scale(x, alpha_value, bits, g):
    """Σ|g|·(Δ/2)·(s²|t| + s|∂k/∂α|(1 − t²)|x − m|) in float64: the size of the two terms the α
    gradient sums per element (they nearly cancel for large α, and across elements)."""
    x, g = x.double(), g.double()
    a = float(torch.tensor(alpha_value, dtype=x.dtype).clamp(1e-4, 0.999))
    n = 2**bits - 1
    delta = 2 / n
    xc = x.clamp(-1, 1)
    m = -1 + (torch.floor((xc + 1) / delta).clamp(0, n - 1) + 0.5) * delta
    k, s, dk = math.log(2 / a - 1) / delta, 1 / (1 - a), 2 / (delta * a * (2 - a))
    t = torch.tanh(k * (xc - m))
    return float((g.abs() * delta / 2 * (s * s * t.abs() + s * dk * (1 - t * t) * (xc - m).abs())).sum())


def assert_alpha_grad_close(got, want, x, alpha_value, bits, g):
    """Rounding-level agreement: float32 sums of thousands of terms, relative to their magnitudes."""
    eps = 1e-6 if x.dtype == torch.float32 else 1e-14  # float32: ~2e-7 seen; a real error is far larger
    tol = eps * alpha_grad_scale(x, alpha_value, bits, g)
    assert abs(float(got) - float(want)) <= tol, (float(got), float(want), tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_fused_matches_the_autograd_composition(bits, dtype, alpha):
    x = inputs(bits, dtype)
    g = torch.randn_like(x)
    y0, gx0, ga0 = run(reference, x, alpha, bits, g)
    y1, gx1, ga1 = run(dsq_quantize, x, alpha, bits, g)
    assert y1.dtype == dtype and y1.shape == x.shape
    assert torch.equal(as_bits(y1), as_bits(y0))  # bit for bit, the sign of zero included
    levels = E.create_estimator("dsq", bits=bits).level_set()
    assert ((y1.double().reshape(-1, 1) - levels).abs().min(dim=1).values < 1e-6).all()
    assert (gx0 != 0).any() and (gx0 == 0).any()  # both regimes present, so the comparison means something
    torch.testing.assert_close(gx1, gx0, **close_tol(dtype))
    assert torch.equal(gx1 == 0, gx0 == 0)
    if 1e-4 < alpha < 0.999:  # on the clamp's edges α gets no gradient (see below)
        assert ga0.abs() > 0
    assert_alpha_grad_close(ga1, ga0, x, alpha, bits, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_estimator_uses_the_fused_function_and_matches(bits, dtype):
    est = E.create_estimator("dsq", bits=bits, role="weight", alpha_init=0.3).to(dtype).train()
    x = inputs(bits, dtype, seed=1).requires_grad_(True)
    y = est(x)
    assert type(y.grad_fn).__name__ == "DSQFunctionBackward"
    g = torch.randn_like(y)
    y.backward(g)
    a = float(est.alpha.detach())  # 0.3 rounded to float32, then widened
    y0, gx0, ga0 = run(reference, x.detach(), a, bits, g, param_dtype=dtype)
    assert torch.equal(as_bits(y.detach()), as_bits(y0))
    torch.testing.assert_close(x.grad, gx0, **close_tol(dtype))
    assert ga0.abs() > 0
    assert_alpha_grad_close(est.alpha.grad, ga0, x.detach(), a, bits, g)
    est.eval()
    assert torch.equal(est(x.detach()), y.detach())  # eval's hard quantizer gives the same values


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-0.5, 2.0)])
@pytest.mark.parametrize("bits", BITS)
def test_other_clip_ranges_match_the_composition(bits, low, high):
    """dsq_quantize on an asymmetric [l, u] (its general path): values, and ∂/∂x zero at l, u and outside."""
    dtype = torch.float64
    edges = torch.tensor([low, high], dtype=dtype)
    x = torch.cat([edges, torch.nextafter(edges, edges.flip(0)), torch.tensor([low - 1, high + 1], dtype=dtype),
                   low + (high - low) * torch.rand(50, dtype=dtype, generator=torch.Generator().manual_seed(bits))])
    g = torch.linspace(1, 2, x.numel(), dtype=dtype)
    a = torch.tensor(0.2, dtype=dtype)

    def grads(fn):
        xg = x.clone().requires_grad_(True)
        y = fn(xg)
        y.backward(g)
        return y.detach(), xg.grad

    def composed(xg):
        soft, hard = dsq_soft(xg, a, bits, low, high)
        return soft + (hard - soft).detach()

    y0, gx0 = grads(composed)
    y1, gx1 = grads(lambda xg: dsq_quantize(xg, a, bits, low, high))
    assert torch.equal(y1, y0)
    assert (gx1[:2] == 0).all() and (gx1[4:6] == 0).all() and (gx1[2:4] != 0).all() and (gx1[6:] != 0).all()
    torch.testing.assert_close(gx1, gx0, **close_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_clip_edges_and_outside_get_no_x_gradient_like_clamp(bits, dtype):
    """torch's clamp backward passes the gradient only strictly inside (l, u); α still gets it."""
    one = torch.ones((), dtype=dtype)
    x = torch.stack([-2 * one, -one, torch.nextafter(-one, one), 0.3 * one, torch.nextafter(one, -one), one, 2 * one])
    g = torch.arange(1, 8, dtype=dtype)  # not symmetric, so the clipped values' α terms do not cancel
    y0, gx0, ga0 = run(reference, x, 0.2, bits, g)
    y1, gx1, ga1 = run(dsq_quantize, x, 0.2, bits, g)
    assert torch.equal(as_bits(y1), as_bits(y0))
    assert (gx1 == 0).tolist() == (gx0 == 0).tolist() == [True, True, False, False, False, True, True]
    torch.testing.assert_close(gx1, gx0, **close_tol(dtype))
    # the clipped values pin Q_S to the end levels, so they add (almost) nothing to ∂α either
    _, gx_out, ga_out = run(dsq_quantize, x[[0, 1, 5, 6]], 0.2, bits, g[:4])
    _, _, ga_out0 = run(reference, x[[0, 1, 5, 6]], 0.2, bits, g[:4])
    assert (gx_out == 0).all()
    assert_alpha_grad_close(ga_out, ga_out0, x[[0, 1, 5, 6]], 0.2, bits, g[:4])


@pytest.mark.parametrize("bits", BITS)
def test_nan_input_like_the_composition(bits):
    x = torch.tensor([0.2, float("nan"), -0.7, 1.5])
    g = torch.ones_like(x)
    y0, gx0, ga0 = run(reference, x, 0.2, bits, g)
    y1, gx1, ga1 = run(dsq_quantize, x, 0.2, bits, g)
    assert y1.isnan().tolist() == y0.isnan().tolist() == [False, True, False, False]
    assert torch.equal(y1[~y1.isnan()], y0[~y0.isnan()])
    assert gx1[1] == 0 and gx0[1] == 0  # clamp's backward zeroes NaN positions
    torch.testing.assert_close(gx1, gx0)
    assert ga1.isnan() and ga0.isnan()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("alpha", [1e-6, 5e-5, 0.9995, 1.3])
def test_alpha_outside_the_clamp_gets_no_gradient(bits, alpha):
    x = inputs(bits, torch.float32, seed=2)
    g = torch.randn_like(x)
    y0, gx0, ga0 = run(reference, x, alpha, bits, g)
    y1, gx1, ga1 = run(dsq_quantize, x, alpha, bits, g)
    assert torch.equal(as_bits(y1), as_bits(y0))
    assert ga0 == 0 and ga1 == 0
    torch.testing.assert_close(gx1, gx0, **close_tol(torch.float32))
    assert (gx0 != 0).any()


def test_alpha_on_the_clamp_edge_like_autograd():
    """α exactly 0.999 or 1e-4: whatever clamp's backward gives there, the fused path gives too."""
    x = inputs(2, torch.float64, seed=3)
    g = torch.randn_like(x)
    for alpha in (0.999, 1e-4, 0.998, 2e-4):
        _, _, ga0 = run(reference, x, alpha, 2, g)
        _, _, ga1 = run(dsq_quantize, x, alpha, 2, g)
        assert_alpha_grad_close(ga1, ga0, x, alpha, 2, g)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("alpha", [0.05, 0.25, 0.7])
def test_gradcheck_fused_function(bits, alpha):
    """float64 gradcheck of the Function's own backward, away from interval edges (where Q_S jumps)."""
    torch.manual_seed(bits)
    n = 2**bits - 1
    x = torch.rand(40, dtype=torch.float64) * 2.6 - 1.3
    edges = -1 + (2 / n) * torch.arange(n + 1, dtype=torch.float64)
    x = x[(x[:, None] - edges).abs().min(dim=1).values > 1e-3][:25]
    assert (x.abs() > 1).any() and (x.abs() < 1).any()
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)

    # The fused forward is the hard staircase (flat almost everywhere), so check its backward
    # against finite differences of the soft staircase Q_S that it claims to differentiate.
    class Soft(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x_, a_):
            with torch.enable_grad():
                xs, as_ = x_.detach().requires_grad_(True), a_.detach().requires_grad_(True)
                y = DSQFunction.apply(xs, as_, bits)
            ctx.save_for_backward(xs, as_)
            ctx.y = y
            return dsq_soft(x_, a_, bits)[0]

        @staticmethod
        def backward(ctx, g):
            xs, as_ = ctx.saved_tensors
            return torch.autograd.grad(ctx.y, (xs, as_), g, retain_graph=True)

    assert torch.autograd.gradcheck(Soft.apply, (x.clone().requires_grad_(True), a), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2])
def test_noncontiguous_and_expanded_gradients(bits):
    """Transposed input and the stride-0 gradient of .sum() take the non-BLAS reduction path."""
    torch.manual_seed(4)
    x = (torch.rand(6, 9, dtype=torch.float64) * 2.4 - 1.2).t()
    assert not x.is_contiguous()
    for make_loss in (lambda y: y.sum(), lambda y: (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum()):
        grads = []
        for fn in (reference, dsq_quantize):
            est = E.create_estimator("dsq", bits=bits).to(torch.float64)
            xg = x.clone().requires_grad_(True) if fn is reference else x.detach().requires_grad_(True)
            make_loss(fn(xg, est._alpha(torch.float64), bits)).backward()
            grads.append((xg.grad, est.alpha.grad))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-11, atol=1e-12)


def test_only_one_input_needs_grad():
    x = inputs(2, torch.float32, seed=5)
    a = torch.tensor(0.3)
    y_ref = reference(x, a, 2)
    # α only
    a_req = a.clone().requires_grad_(True)
    dsq_quantize(x, a_req, 2).sum().backward()
    a_ref = a.clone().requires_grad_(True)
    reference(x, a_ref, 2).sum().backward()
    assert_alpha_grad_close(a_req.grad, a_ref.grad, x, 0.3, 2, torch.ones_like(x))
    # x only
    xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dsq_quantize(xg, a, 2).sum().backward()
    reference(xr, a, 2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, **close_tol(torch.float32))
    # neither: no graph, same values
    with torch.no_grad():
        y = dsq_quantize(x, a, 2)
    assert y.grad_fn is None and torch.equal(as_bits(y), as_bits(y_ref))


def test_a_wrong_backward_would_be_caught():
    """Guard for the tests above: their tolerances catch a 1% error in ∂α and 1e-4 in ∂x (float32)."""
    x = inputs(2, torch.float32, seed=6)
    g = torch.rand_like(x) + 0.5  # one sign: little cancellation across elements
    _, gx0, ga0 = run(reference, x, 0.2, 2, g)
    _, gx1, ga1 = run(dsq_quantize, x, 0.2, 2, g)
    assert_alpha_grad_close(ga1, ga0, x, 0.2, 2, g)
    with pytest.raises(AssertionError):  # a 1% error in ∂α is caught
        assert_alpha_grad_close(ga1 * 1.01, ga0, x, 0.2, 2, g)
    scale = alpha_grad_scale(x, 0.2, 2, g)
    assert 1e-6 * scale < 3e-3 * abs(float(ga0))  # float32 tolerance: under 0.3% of the gradient here
    with pytest.raises(AssertionError):
        torch.testing.assert_close(gx1, gx0 * (1 + 1e-4), **close_tol(torch.float32))


class TorchCalls(TorchFunctionMode):
    """The names of the torch functions and tensor methods called while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bits, low, high, shortcut", [
    (1, -1.0, 1.0, True), (1, -0.5, 0.5, True), (2, -1.0, 1.0, False), (1, 0.0, 1.0, False), (1, -1.0, 0.5, False)])
def test_one_bit_centred_on_zero_skips_the_interval_index(bits, low, high, shortcut):
    """One interval centred on 0 (m = 0, levels ±u) needs no interval index: the forward is tanh(k·x) and its
    sign, without the floor of (x − l)/Δ (3 passes instead of 10). Other cases compute the index."""
    x = torch.randn(64, requires_grad=True)
    with TorchCalls() as calls:
        y = dsq_quantize(x, torch.tensor(0.2), bits, low, high)
    assert ("floor_" not in calls.names) is shortcut
    soft, hard = dsq_soft(x.detach(), torch.tensor(0.2), bits, low, high)
    assert torch.equal(y.detach(), hard)


def test_a_second_derivative_through_the_fused_function_is_refused():
    """The backward is DSQ's soft gradient, not the derivative of the hard forward: differentiating it again
    raises (``once_differentiable``) instead of giving a number."""
    x = inputs(2, torch.float64).requires_grad_(True)
    y = dsq_quantize(x, torch.tensor(0.2, dtype=torch.float64, requires_grad=True), 2)
    assert type(y.grad_fn).__name__ == "DSQFunctionBackward"
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("size", [8, 9, 33])
def test_nan_input_gets_clamp_s_zero_wherever_it_lies_alpha_learned_or_not(bits, size):
    """HardTanh's backward kernel gives a NaN x the gradient g in its scalar tail (0 in its vector body): DSQ
    zeroes it as clamp does wherever the NaN falls, whether α takes a gradient (which then is NaN) or not."""
    x = torch.linspace(-0.9, 0.9, size, dtype=torch.float64)
    x[-1] = math.nan
    for alpha_learned in (True, False):
        alpha = torch.tensor(0.2, dtype=torch.float64, requires_grad=alpha_learned)
        xg = x.clone().requires_grad_(True)
        dsq_quantize(xg, alpha, bits).backward(torch.ones_like(x))
        assert xg.grad[-1] == 0 and (xg.grad[:-1] != 0).all()
        assert not alpha_learned or alpha.grad.isnan()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.9])
def test_the_soft_staircase_meets_the_levels_at_the_interval_edges_and_is_halfway_at_the_midpoints(bits, alpha):
    """Q_S(l + iΔ) = l + iΔ (φ = s·tanh(∓kΔ/2) = ∓1 there) and Q_S(m_i) = m_i, for every α: the soft
    staircase joins the quantization levels, and hard(x) is the level on x's side of m_i."""
    n = 2**bits - 1
    delta = 2 / n
    edges = -1 + delta * torch.arange(n + 1, dtype=torch.float64)
    mids = -1 + delta * (torch.arange(n, dtype=torch.float64) + 0.5)
    a = torch.tensor(alpha, dtype=torch.float64)
    soft, hard = dsq_soft(edges, a, bits)
    torch.testing.assert_close(soft, edges, rtol=0, atol=1e-12)
    assert torch.equal(hard, edges)
    soft, _ = dsq_soft(mids, a, bits)
    torch.testing.assert_close(soft, mids, rtol=0, atol=1e-12)
    _, hard = dsq_soft(torch.cat([mids - delta / 4, mids + delta / 4]), a, bits)
    assert torch.equal(hard, torch.cat([edges[:-1], edges[1:]]))

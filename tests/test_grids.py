"""Quantizer grids: every estimator declares its level sets, and the MINW family on another grid
quantizes to exactly that grid's levels (DoReFa's, EWGS's), with its own gradient unchanged."""
import pytest
import torch

import estimators as E
from estimators import quantizers as Qz

MINW_FAMILY = ["aqe", "ste", "clipped_ste", "approx_sign", "ede", "reste", "xnor"]


def test_every_estimator_declares_known_grids():
    for name in E.list_estimators():
        cls = E.get_estimator_class(name)
        assert cls.grids and set(cls.grids) <= set(E.list_grids()), name
        assert ("grid" in cls.params) == (len(cls.grids) > 1), name  # a choice only where there is one
    own = {name: E.get_estimator_class(name).grids[0] for name in E.list_estimators()}
    assert {n: own[n] for n in ("dorefa", "pact", "ewgs", "dsq", "lsq", "hwgq", "lq_nets")} == {
        "dorefa": "uniform", "pact": "uniform", "ewgs": "uniform_signed", "dsq": "uniform_signed",
        "lsq": "learned_step", "hwgq": "half_normal", "lq_nets": "learned_basis"}
    assert all(own[n] == "minw" and E.get_estimator_class(n).grids == ("minw", "uniform", "uniform_signed")
               for n in MINW_FAMILY)


def test_catalog_lists_the_grids():
    cat = {e["name"]: e for e in E.estimator_catalog()}
    assert cat["aqe"]["grids"] == ["minw", "uniform", "uniform_signed"] and cat["dorefa"]["grids"] == ["uniform"]
    assert cat["aqe"]["params"]["grid"]["choices"] == ["minw", "uniform", "uniform_signed"]


def test_a_grid_an_estimator_cannot_use_is_refused_with_the_grids_it_can():
    with pytest.raises(E.UnknownNameError, match=r"aqe: grid='learned_step' is not allowed; choose one of minw, "
                                                 r"uniform, uniform_signed"):
        E.create_estimator("aqe", bits=2, grid="learned_step")
    with pytest.raises(E.UnknownNameError, match=r"estimator 'dorefa' has no parameter 'grid'"):
        E.create_estimator("dorefa", bits=2, grid="uniform")


def _outputs(est, x):
    """The eval-mode output divided by the estimator's scale (the unscaled levels)."""
    est.eval()
    with torch.no_grad():
        y, s = est(x), est.scale(x)
    return (y if s is None else y / s).double()


def _levels_reached(est, x) -> list[int]:
    """Indices of ``est.level_set()`` its unscaled outputs land on, after checking every output is on a level."""
    out, levels = _outputs(est, x).reshape(-1, 1), est.level_set().reshape(1, -1)
    dist, idx = (out - levels).abs().min(dim=1)
    assert dist.max() < 1e-9  # no other value (a per-filter scale divides out up to rounding)
    return sorted(set(idx.tolist()))


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("name", MINW_FAMILY)
def test_uniform_grid_is_exactly_dorefas_level_set(name, role, bits):
    torch.manual_seed(bits)
    x = torch.rand(4000, 9, dtype=torch.float64) * 2.4 - 1.2
    est = E.create_estimator(name, bits=bits, role=role, grid="uniform")
    dorefa = E.create_estimator("dorefa", bits=bits, role=role)
    assert torch.equal(est.level_set(), dorefa.level_set())
    assert _levels_reached(est, x) == _levels_reached(dorefa, x) == list(range(len(dorefa.level_set())))
    if role == "activation":  # the same function as DoReFa's quantize_k(clip(x, 0, 1))
        assert torch.equal(_outputs(est, x), _outputs(dorefa, x))


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("name", ["aqe", "ste"])
def test_uniform_signed_grid_is_ewgs_and_dsqs(name, role, bits):
    torch.manual_seed(bits)
    x = torch.rand(3000, 7, dtype=torch.float64) * 2.4 - 1.2
    est = E.create_estimator(name, bits=bits, role=role, grid="uniform_signed")
    for other in ("ewgs", "dsq"):
        assert torch.equal(est.level_set(), E.create_estimator(other, bits=bits, role=role).level_set())
    assert torch.equal(_outputs(est, x), _outputs(E.create_estimator("ewgs", bits=bits, role=role), x))


def test_minw_grid_is_the_default_and_unchanged():
    x = torch.tensor([-1.0, -0.2, 0.0, 0.3, 0.5, 2.0])
    assert E.create_estimator("ste", bits=2).grid == "minw"
    assert torch.equal(E.create_estimator("ste", bits=2).eval()(x), Qz.ternary(x))
    assert torch.equal(E.create_estimator("ste", bits=2, grid="minw").eval()(x), Qz.ternary(x))


def test_grid_levels_by_hand():
    def lv(name, bits, role, grid):
        return E.create_estimator(name, bits=bits, role=role, grid=grid).level_set().tolist()
    assert lv("aqe", 2, "weight", "uniform") == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    assert lv("aqe", 2, "activation", "uniform") == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert lv("aqe", 2, "activation", "uniform_signed") == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    assert lv("aqe", 1, "weight", "uniform") == [-1, 1] and lv("aqe", 1, "activation", "uniform") == [0, 1]
    assert len(lv("ste", 3, "weight", "uniform")) == 8 and len(lv("ste", 3, "weight", "minw")) == 7


@pytest.mark.parametrize("grid", ["uniform", "uniform_signed"])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_aqe_on_a_uniform_grid_mixes_that_grids_q_and_keeps_eq18(grid, role, bits):
    """x̂ = α·Q(x) + (1 − α)·x with the grid's Q (composed here from DoReFa's quantize_k), ∂ = 2α·g·1[|x| ≤ 1]."""
    est = E.create_estimator("aqe", bits=bits, role=role, grid=grid)
    est.set_progress(3, 10)
    alpha = 0.5 * 2**0.3
    torch.manual_seed(bits)
    x = (torch.rand(50, 6, dtype=torch.float64) * 2.6 - 1.3).requires_grad_(True)
    g = torch.randn(50, 6, dtype=torch.float64)
    n = 2**bits - 1
    if grid == "uniform" and role == "activation":
        q = torch.round(x.detach().clamp(0, 1) * n) / n
    elif grid == "uniform" and bits == 1:
        q = torch.where(x.detach() >= 0, 1.0, -1.0).double()
    else:
        q = 2 * torch.round((x.detach().clamp(-1, 1) + 1) / 2 * n) / n - 1
    y = est(x)
    torch.testing.assert_close(y, alpha * q + (1 - alpha) * x.detach(), rtol=0, atol=1e-12)
    y.backward(g)
    torch.testing.assert_close(x.grad, 2 * alpha * g * (x.detach().abs() <= 1).double())
    const = E.create_estimator("aqe", bits=bits, role=role, grid=grid, schedule="constant")  # α = ½ ≡ clipped STE
    xc = x.detach().clone().requires_grad_(True)
    const(xc).backward(g)
    torch.testing.assert_close(xc.grad, g * (x.detach().abs() <= 1).double())


@pytest.mark.parametrize("name", ["ste", "clipped_ste", "approx_sign", "ede", "reste", "xnor"])
def test_pseudo_gradient_does_not_depend_on_the_grid(name):
    torch.manual_seed(3)
    x = torch.randn(8, 30, dtype=torch.float64)
    g = torch.randn(8, 30, dtype=torch.float64)
    grads = []
    for grid in ("minw", "uniform", "uniform_signed"):
        est = E.create_estimator(name, bits=2, role="activation", grid=grid)
        est.set_progress(2, 5)
        xg = x.clone().requires_grad_(True)
        est(xg).backward(g)
        grads.append(xg.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=0)

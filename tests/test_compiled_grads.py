"""ReSTE's pseudo-gradient as one compiled loop (estimators.compiled): the eager values to a few ulp, the
same zeros, one kernel for every size and epoch, compiled only when hot under ``auto``, and eager
again, with one warning, when compiling fails."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import estimators as E
from estimators import compiled
from estimators.ede import _reste_grad

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture
def fresh(monkeypatch):
    """The module's state for this test alone (kernels, counts, failures); returns the module."""
    monkeypatch.setattr(compiled, "_kernels", {})
    monkeypatch.setattr(compiled, "_eager_elements", {})
    monkeypatch.setattr(compiled, "_failed", [])
    return compiled


def reste(progress=6, **params):
    est = E.create_estimator("reste", bits=2, role="activation", **params).train()
    est.set_progress(progress, 10)
    return est


def edges(est):
    """Values at and one float either side of ±ε and ±t, 0, beyond t, ±inf, and random ones in and around [−t, t]."""
    eps, t = (torch.tensor(est.hparams[k], dtype=torch.float32) for k in ("eps", "t"))
    points = [0.0, float("inf")]
    for p in (eps, t):
        points += [p.item(), torch.nextafter(p, p + 1).item(), torch.nextafter(p, p - 1).item()]
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.tensor(points), -torch.tensor(points), torch.randn(3984, generator=g) * t.item(),
                   torch.rand(1000, generator=g) * 1e-3])
    return x.reshape(8, -1)


def grads(est, x, g, mode, monkeypatch):
    monkeypatch.setattr(compiled, "MODE", mode)
    xg = x.clone().requires_grad_(True)
    est(xg).backward(g)
    return xg.grad


@pytest.mark.parametrize(("params", "progress"), [
    ({}, 6), ({}, 0), ({}, 10), ({"o_end": 100.0, "eps": 1e-6}, 6), ({"t": 0.3, "eps": 0.07}, 4)])
def test_the_compiled_gradient_is_the_eager_one(params, progress, fresh, monkeypatch):
    est = reste(progress, **params)
    x = edges(est)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    eager = grads(est, x, g, "off", monkeypatch)
    fused = grads(est, x, g, "on", monkeypatch)
    assert _reste_grad in fresh._kernels and not fresh._failed  # it really ran compiled (a failure falls back)
    assert torch.equal(fused == 0, eager == 0)  # the masks |x| ≤ t and |x| > ε decided alike, also at ±inf
    assert torch.isfinite(fused).all()
    # both round exp2(p·log2 m) (SLEEF's vs ATen's log2): within the test_reste_power bound of each other
    bound = (4 + 2 * abs((1 - est.o) / est.o) * abs(math.log2(est.hparams["eps"])) * math.log(2)) * EPS32
    torch.testing.assert_close(fused, eager, rtol=bound, atol=0)


def test_one_kernel_for_every_size_and_every_epoch(fresh, monkeypatch):
    est = reste(3)
    x = torch.randn(64, 8, 9, 9)
    grads(est, x, torch.ones_like(x), "on", monkeypatch)
    graphs = counters["stats"]["unique_graphs"]
    for shape, progress in [((7, 3), 3), ((4097,), 5), ((2, 16, 32, 32), 9)]:
        est.set_progress(progress, 10)
        x = torch.randn(shape)
        got = grads(est, x, torch.ones_like(x), "on", monkeypatch)
        want = grads(est, x, torch.ones_like(x), "off", monkeypatch)
        torch.testing.assert_close(got, want, rtol=4 * EPS32, atol=0)
    assert counters["stats"]["unique_graphs"] == graphs and not fresh._failed  # compiled once, nothing again


def test_auto_compiles_a_formula_once_it_is_hot(fresh, monkeypatch):
    monkeypatch.setattr(compiled, "MODE", "auto")
    monkeypatch.setattr(compiled, "HOT_ELEMENTS", 10_000)
    est = reste()
    x = torch.randn(4, 1024)
    for calls, hot in [(1, False), (2, False), (3, True), (4, True)]:
        with torch.no_grad():
            est.pseudo_grad(x, torch.ones_like(x))
        assert (_reste_grad in fresh._kernels) == hot, calls
    assert fresh._eager_elements[_reste_grad] == 3 * 4096 and not fresh._failed  # counted until it compiled


def test_what_does_not_qualify_runs_eagerly(fresh, monkeypatch):
    monkeypatch.setattr(compiled, "MODE", "on")
    x, g = torch.randn(8, 64), torch.randn(8, 64)
    with torch.no_grad():
        for a, b in [(x.double(), g.double()), (x.t(), g.t()), (x, g[:4]), (x, g.half())]:
            assert compiled.run(_reste_grad, a, b, -0.3, 0.6, 0.1, 1.5) is None
        monkeypatch.setattr(compiled, "MODE", "off")
        assert compiled.run(_reste_grad, x, g, -0.3, 0.6, 0.1, 1.5) is None
    monkeypatch.setattr(compiled, "MODE", "on")
    assert compiled.run(_reste_grad, x, g, -0.3, 0.6, 0.1, 1.5) is None  # autograd on: a double backward
    est = reste()  # a backward with create_graph=True runs with autograd on: the eager ops, the eager values
    xg = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(est(xg), xg, g, create_graph=True)
    assert not fresh._kernels
    monkeypatch.setattr(compiled, "MODE", "off")
    assert torch.equal(gx, grads(est, x, g, "off", monkeypatch))


def test_a_failed_compile_warns_once_and_stays_eager(fresh, monkeypatch):
    def broken(fn, **kwargs):
        def kernel(*args):
            raise RuntimeError("no C++ compiler")
        return kernel

    monkeypatch.setattr(torch, "compile", broken)
    est = reste()
    x = edges(est)
    g = torch.randn(x.shape)
    want = grads(est, x, g, "off", monkeypatch)
    with pytest.warns(RuntimeWarning, match="compiled pseudo-gradients are off.*RuntimeError: no C\\+\\+ compiler"):
        got = grads(est, x, g, "on", monkeypatch)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(grads(est, x, g, "on", monkeypatch), want)  # no second warning, no second try
    assert len(fresh._failed) == 1


def test_bitbench_compile_chooses_the_mode():
    code = "from estimators import compiled; print(compiled.MODE)"
    got = {}
    for value in (None, "", "on", "OFF"):
        env = {k: v for k, v in os.environ.items() if k != "BITBENCH_COMPILE"}
        if value is not None:
            env["BITBENCH_COMPILE"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        got[value] = out.stdout.strip()
    assert got == {None: "auto", "": "auto", "on": "on", "OFF": "off"}
    with pytest.raises(ValueError, match="BITBENCH_COMPILE must be one of auto, on, off, got 'yes'"):
        compiled.compile_setting("yes")

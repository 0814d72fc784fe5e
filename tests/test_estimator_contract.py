"""The contract every registered estimator keeps, parametrised over the whole registry."""
import pytest
import torch

import estimators as E

NAMES = E.list_estimators()
REQUIRED = {"aqe", "ste", "clipped_ste", "approx_sign", "ede", "xnor", "dorefa", "pact", "lsq", "dsq", "ewgs", "reste"}


def test_registry_holds_the_required_estimators():
    assert REQUIRED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_gives_formula_and_paper(name):
    cls = E.get_estimator_class(name)
    doc = cls.__doc__ or ""
    assert "forward" in doc.lower() and ("backward" in doc.lower() or "∂" in doc), name
    assert cls.paper and any(str(y) in cls.paper for y in range(2013, 2025)), name


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_finite_gradients_and_levels(name, role, bits):
    torch.manual_seed(0)
    est = E.create_estimator(name, bits=bits, role=role)
    est.set_progress(1, 4)
    x = (torch.randn(6, 4, 3, 3) * 1.3).requires_grad_(True)
    y = est(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in est.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    est.eval()
    with torch.no_grad():
        h = est(x)
        scale = est.scale(x)
    codes = (h if scale is None else h / scale).double()
    levels = est.level_set()
    on_level = torch.isclose(codes.reshape(-1, 1), levels.reshape(1, -1), rtol=0, atol=1e-6).any(dim=1)
    assert on_level.all(), f"{name} {role} {bits}: off-level values {codes.flatten()[~on_level][:5]}"
    assert len(levels) <= 2**bits


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_a_backward_that_builds_a_graph_gives_the_ordinary_gradient(name, bits):
    """create_graph=True (gradient penalties, double backward) runs the pseudo-gradient with autograd on:
    ops with out= refuse that, so it must work without them and give the same values."""
    def grad(create_graph):
        torch.manual_seed(0)
        est = E.create_estimator(name, bits=bits, role="activation")
        est.set_progress(1, 4)
        x = (torch.randn(6, 4, 3, 3) * 0.7).requires_grad_(True)
        (gx,) = torch.autograd.grad((est(x) * torch.randn_like(x)).sum(), x, create_graph=create_graph)
        return gx

    torch.testing.assert_close(grad(True), grad(False), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_is_deterministic_and_ignores_training_schedule(name):
    est = E.create_estimator(name, bits=1, role="weight").eval()
    x = torch.randn(8, 5)
    a = est(x)
    est.set_progress(9, 10)
    assert torch.equal(a, est(x))


def test_unknown_things_raise_errors_that_list_what_exists():
    with pytest.raises(E.UnknownNameError, match=r"unknown estimator 'sgn'; known: approx_sign, aqe, "):
        E.create_estimator("sgn")
    with pytest.raises(E.UnknownNameError,
                       match=r"estimator 'aqe' has no parameter 'alpah'; known: act_momentum, act_stats, alpha_end, "):
        E.create_estimator("aqe", alpah=0.3)
    with pytest.raises(ValueError, match=r"does not support 9 bits; supported: 1–8 \(32 = float"):
        E.create_estimator("ste", bits=9)
    with pytest.raises(E.UnknownNameError, match="unknown role 'bias'"):
        E.create_estimator("ste", role="bias")
    with pytest.raises(ValueError, match=r"pow2_thresholds=\[0.5, 0.1, 0.2\] is not allowed: expected strictly incr"):
        E.create_estimator("aqe", bits=3, pow2_thresholds=[0.5, 0.1, 0.2])
    with pytest.raises(ValueError, match="needs 3 increasing positive thresholds"):  # the count depends on bits
        E.create_estimator("aqe", bits=3, pow2_thresholds=[0.1, 0.2])


@pytest.mark.parametrize("name", NAMES)
def test_a_class_built_without_arguments_is_create_estimator_s_default(name):
    """``Cls()`` is a 1-bit weight estimator with the default parameters, as ``create_estimator(name)`` is."""
    est, made = E.get_estimator_class(name)(), E.create_estimator(name)
    assert (est.bits, est.role, est.hparams) == (made.bits, made.role, made.hparams) and est.bits == 1
    assert torch.equal(est.level_set(), made.level_set())


def test_a_float_parameter_given_an_int_is_stored_as_a_float():
    """Through the class and through validate_estimator_params alike (a spec's JSON 1 and 1.0 are one value)."""
    est = E.create_estimator("aqe", alpha_start=1, act_momentum=1)
    assert type(est.hparams["alpha_start"]) is float and type(est.hparams["act_momentum"]) is float
    full = E.validate_estimator_params("ede", {"t_max": 20})
    assert type(full["t_max"]) is float and (full["t_min"], full["t_max"]) == (0.1, 20.0)


@pytest.mark.parametrize("value, kept", [
    ([0.02, 0.07, 0.14], [0.02, 0.07, 0.14]), ((1e-9, 1), [1e-9, 1.0]), ([1], [1.0]),
    ([0.0, 0.5, 0.9], "increasing fractions"), ([-0.1, 0.5], "increasing fractions"),
    ([0.5, 1.0000001], "increasing fractions"), ([0.5, 0.5], "increasing fractions"),
    ([0.1, True], "list of numbers"), ([True], "list of numbers"), (["0.1"], "list of numbers"),
    ([], "list of numbers"), ("0.1", "list of numbers"),
])
def test_pow2_thresholds_are_increasing_fractions_in_zero_one(value, kept):
    """The rule is (0, 1] and strictly increasing, checked at any bit width (also where pow2 is not used)."""
    if isinstance(kept, list):
        assert E.create_estimator("aqe", bits=2, pow2_thresholds=value).hparams["pow2_thresholds"] == kept
    else:
        with pytest.raises(ValueError, match=rf"pow2_thresholds=.* is not allowed: expected .*{kept}"):
            E.create_estimator("aqe", bits=2, pow2_thresholds=value)


def test_catalog_lists_parameters_and_formulas():
    cat = {e["name"]: e for e in E.estimator_catalog()}
    assert set(cat) == set(NAMES)
    assert cat["aqe"]["params"]["backward"]["choices"] == ["eq18", "alg1", "autodiff"]
    assert "α·Q(x) + (1 − α)·x" in cat["aqe"]["formula"]
    assert cat["aqe"]["scheduled"] and not cat["ste"]["scheduled"]


@pytest.mark.parametrize("name", NAMES)
def test_allowed_range_is_what_check_accepts(name):
    """The catalogue's "allowed" text (README) gives the bounds check() enforces, both ends inclusive."""
    cls = E.get_estimator_class(name)
    for k, p in cls.params.items():
        if p.low is None:
            continue
        assert p.allowed() == f"[{p.low:.12g}, {p.high:.12g}]", (name, k)
        for ok in (p.low, p.high):
            assert p.check(name, k, ok) == ok
        for bad in (p.low - 1e-9, p.high + 1e-9):
            with pytest.raises(ValueError, match=rf"{name}: {k}=.* is outside \[{p.low}, {p.high}\]"):
                p.check(name, k, bad)


def test_allowed_text_for_each_kind_of_parameter():
    from estimators.base import Param
    from estimators.minw import increasing_fractions

    assert Param("a", "", choices=("a", "b")).allowed() == "one of a, b"
    assert Param(0.5, "", low=1e-6, high=1e3).allowed() == "[1e-06, 1000]"
    assert Param(0.5, "", low=0.0).allowed() == "≥ 0" and Param(0.5, "", high=2.5).allowed() == "≤ 2.5"
    assert Param(3, "").allowed() == "any number" and Param(True, "").allowed() == "true or false"
    assert Param(None, "", validate=increasing_fractions).allowed() == (
        "a list of strictly increasing numbers in (0, 1], or null")
    assert Param(None, "").allowed() == "any"


@pytest.mark.parametrize("name", NAMES)
def test_scheduled_says_whether_training_progress_changes_the_estimator(name):
    """``scheduled`` is True exactly when :meth:`set_progress` changes what the estimator computes: its output
    or its gradient at some input, between the first and the last epoch (logs name schedules by it)."""
    x = torch.linspace(-1.4, 1.4, 57).reshape(3, 19)

    def output_and_gradient(epoch: int):
        est = E.create_estimator(name, bits=1, role="activation")
        est.set_progress(epoch, 4)
        xg = x.clone().requires_grad_(True)
        y = est(xg)
        y.backward(torch.ones_like(y))
        return y.detach(), xg.grad

    (y0, g0), (y1, g1) = output_and_gradient(0), output_and_gradient(4)
    changes = not (torch.equal(y0, y1) and torch.equal(g0, g1))
    assert E.get_estimator_class(name).scheduled == changes


def test_progress_is_the_epoch_over_the_total_within_zero_and_one():
    est = E.create_estimator("aqe", bits=1)
    assert est.progress == 0.0  # before training
    for (epoch, total), progress in {(1, 1): 1.0, (1, 4): 0.25, (4, 4): 1.0, (5, 4): 1.0, (-1, 4): 0.0,
                                     (0, 0): 0.0}.items():
        est.set_progress(epoch, total)
        assert est.progress == progress, (epoch, total)


def test_an_estimators_grid_is_the_one_asked_for_or_its_own():
    assert E.create_estimator("aqe").grid == "minw"
    assert E.create_estimator("aqe", grid="uniform_signed").grid == "uniform_signed"
    assert E.create_estimator("dorefa").grid == "uniform" and E.create_estimator("dsq").grid == "uniform_signed"


def test_parameter_specs_cannot_be_changed_on_an_estimator_class():
    """Param objects are shared by every instance (and the catalogue): frozen, so no caller can move a default."""
    import dataclasses

    from estimators.base import get_estimator_class

    p = get_estimator_class("dsq").params["alpha_init"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.default = 0.5


def test_round_ste_rounds_forward_and_passes_the_gradient_unchanged():
    from estimators.base import round_ste

    x = torch.tensor([-1.5, -0.4, 0.5, 0.6, 2.49, 3.0], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    g = torch.arange(1.0, 7.0)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_a_class_answers_which_grid_its_parameters_choose():
    from estimators.base import get_estimator_class

    aqe = get_estimator_class("aqe")
    assert aqe.grid_for({}) == "minw" and aqe.grid_for({"grid": "uniform"}) == "uniform"


def test_a_number_parameter_refuses_booleans_and_text_and_a_flag_takes_only_booleans():
    from estimators.base import Param

    number, flag = Param(0.5, "a number", low=0.0, high=1.0), Param(False, "a flag")
    assert number.check("e", "x", 1) == 1.0
    for bad in (True, "0.5", None):
        with pytest.raises(ValueError, match="x must be a number"):
            number.check("e", "x", bad)
    assert flag.check("e", "f", True) is True and flag.check("e", "f", False) is False
    for bad in (1, "yes"):
        with pytest.raises(ValueError, match="f must be true or false"):
            flag.check("e", "f", bad)


def test_an_estimators_repr_gives_its_bits_role_and_parameters():
    assert repr(E.create_estimator("lsq", bits=2)).endswith("(bits=2, role=weight)")  # LSQ has no parameters
    aqe = repr(E.create_estimator("aqe", bits=1, role="activation", backward="alg1"))
    assert "(bits=1, role=activation, " in aqe and "backward=alg1" in aqe


def test_the_catalogue_cli_prints_the_block_or_refreshes_a_file(tmp_path, monkeypatch, capsys):
    from estimators import catalog

    monkeypatch.setattr("sys.argv", ["catalog"])
    catalog.main()
    assert capsys.readouterr().out == catalog.catalog_markdown()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{catalog.START}\nstale\n{catalog.END}\nend\n")
    monkeypatch.setattr("sys.argv", ["catalog", "--write", str(readme)])
    catalog.main()
    assert readme.read_text() == f"intro\n{catalog.START}\n{catalog.catalog_markdown()}{catalog.END}\nend\n"
    assert capsys.readouterr().out == ""
    monkeypatch.setattr("sys.argv", ["catalog", "--help"])
    with pytest.raises(SystemExit):
        catalog.main()
    assert catalog.__doc__.splitlines()[0] in " ".join(capsys.readouterr().out.split())

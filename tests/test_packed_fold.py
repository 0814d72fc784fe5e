"""Level folds (issue 16): a constant-statistic ternary / powers-of-two next quantizer as integer steps on A.

The folded layer's output planes must equal torch's quantizer output bit for bit on random and adversarial
accumulators: ties |z| = Δ (ternary's strict ``>``) and |z|/max = t_j (pow2's ``bucketize(right=True)``),
HardTanh saturation at ±1, γ < 0, γ = 0, max-pool before BN; on both backends. Whole trained nets with
running statistics agree with torch; files written before the folds still load and run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import estimators
from estimators import QConv2d
from tests.test_packed import check_agreement, digits, one_thread, train  # noqa: F401 (fixtures)
from workers.models import create_model
from workers.packed import PackedNet, export_model
from workers.packed import fold as fold_mod
from workers.packed.engine import dequantize
from workers.packed.format import read_packed
from workers.packed.kernels import BACKENDS

CHANNELS = 16


def set_stat(quantizer_module, s: float) -> None:
    q = quantizer_module.quantizer
    q.running_stat.fill_(s)
    q.running_stat_set.fill_(True)


def tie_stat(z_star: float, a_bits: int) -> float:
    """A float32 running statistic s for which torch's quantizer switches exactly at |z| = z_star
    (ternary: 0.7·s == z_star; pow2: z_star / s == the top edge, both in float32 as torch computes them)."""
    z = torch.tensor(abs(z_star))
    if a_bits == 2:
        guess, ok = z / 0.7, lambda s: bool(0.7 * s == z)  # torch's Δ = delta_ratio·s
    else:
        edge = torch.tensor(estimators.quantizers.pow2_thresholds(a_bits)[-1])
        guess, ok = z / edge, lambda s: bool(z / s == edge)  # torch's |x| / max|x| against the edges
    up = down = guess
    for _ in range(200):  # step ulp by ulp away from the guess
        for s in (up, down):
            if ok(s):
                return float(s)
        up, down = torch.nextafter(up, torch.tensor(np.inf)), torch.nextafter(down, torch.tensor(-np.inf))
    raise AssertionError(f"no float32 statistic puts a tie at {z_star}")


def level_block(a_bits: int, gamma: str, pool: bool, w_bits: int = 1, in_bits: int = 1, cin: int = 8) -> nn.Sequential:
    """conv (``w_bits`` × ``in_bits``) → [MaxPool] → BN → HT → a conv whose ``a_bits`` input quantizer has a
    running statistic. BN: ε = 0, var = 1, γ in steps of 2^−10, integer means (z on exact values); channel 0
    carries a tie at Δ / at the top pow2 edge (the statistic is chosen for it); channel 1 saturates at ±1;
    channel 2 has γ = 0; ``gamma`` pos / neg / mixed gives the others' signs."""
    torch.manual_seed(a_bits + 7 * pool)
    est = ("aqe", {"act_stats": "running"})
    first = QConv2d(cin, CHANNELS, 3, 1, 1, w_bits=w_bits, a_bits=in_bits, estimator=est)
    if getattr(first.input_quantizer.quantizer, "tracks_running_stat", False):
        set_stat(first.input_quantizer, 1.3)
    bn = nn.BatchNorm2d(CHANNELS, eps=0.0)
    sign = {"pos": torch.ones(CHANNELS), "neg": -torch.ones(CHANNELS),
            "mixed": torch.tensor([1.0, -1.0] * (CHANNELS // 2))}[gamma]
    with torch.no_grad():
        bn.running_var.fill_(1.0)
        bn.running_mean.copy_(torch.randint(-4, 5, (CHANNELS,)).float())
        bn.weight.copy_(sign * torch.randint(1, 33, (CHANNELS,)).float() / 1024)
        bn.bias.zero_()
        bn.weight[1] = sign[1] * 2.0  # saturates
        bn.weight[2] = 0.0  # constant channel
        bn.bias[2] = 0.3
    nxt = QConv2d(CHANNELS, 4, 3, 1, 1, w_bits=1, a_bits=a_bits, estimator=est)
    layers = [first] + ([nn.MaxPool2d(2)] if pool else []) + [bn, nn.Hardtanh(), nxt]
    model = nn.Sequential(*layers).eval()
    # a tie: Δ (or the top pow2 edge·max) equal to a value z takes on channel 0
    with torch.no_grad():
        z = model[:-1](torch.randn(64, cin, 8, 8))[:, 0]
    set_stat(nxt.input_quantizer, tie_stat(float(z.abs()[z != 0].median()), a_bits))
    return model


def folded_planes(model: nn.Sequential, x: torch.Tensor, path: Path, backend: str) -> np.ndarray:
    export_model(model, path)
    net = PackedNet.load(path, threads=1, backend=backend)
    assert net.header.layers[0].steps is not None and net.header.layers[0].bn is None
    op = net.layers[0](x.numpy().transpose(0, 2, 3, 1))
    assert op.bits == CHANNELS
    return dequantize(op.unpacked(), net.header.layers[1].input.unit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("a_bits", [2, 3, 4])
@pytest.mark.parametrize("gamma", ["pos", "neg", "mixed"])
@pytest.mark.parametrize("pool", [False, True])
def test_folded_levels_equal_torch_bit_for_bit(tmp_path, backend, a_bits, gamma, pool):
    model = level_block(a_bits, gamma, pool)
    x = torch.randn(32, 8, 8, 8)
    with torch.no_grad():
        z = model[:-1](x)
        ref = model[-1].input_quantizer(z).permute(0, 2, 3, 1).numpy()
        s = model[-1].input_quantizer.quantizer.running_stat
        top_edge = torch.tensor(estimators.quantizers.pow2_thresholds(max(a_bits, 3))[-1])
        ties = z[:, 0].abs() == 0.7 * s if a_bits == 2 else z[:, 0].abs() / s == top_edge
    assert ties.any(), "the block must hit the quantizer's edge exactly"
    assert (z[:, 1].abs() == 1).any() and (z[:, 2] == z[0, 2, 0, 0]).all()  # saturation, constant channel
    ours = folded_planes(model, x, tmp_path / "f.bbpack", backend)
    assert ours.shape == ref.shape and (ours == ref).all()
    assert len(np.unique(ref)) >= (3 if a_bits == 2 else 5)  # the staircase is exercised, not one level


@pytest.mark.parametrize("a_bits", [2, 3])
def test_bisection_equals_the_exhaustive_search(monkeypatch, a_bits):
    """Wide accumulator ranges bisect each threshold on torch's output: the same thresholds as evaluating
    every integer."""
    model = level_block(a_bits, "mixed", pool=False)
    args = dict(a_max=72, unit=1.0, spatial=True, channels=CHANNELS, levels=1 if a_bits == 2 else 3,
                bias=None, bn=model[1], hardtanh=model[2], quantizer=model[3].input_quantizer.quantizer)
    full = fold_mod.level_thresholds(**args)
    monkeypatch.setattr(fold_mod, "FULL_RANGE", 0)
    bisected = fold_mod.level_thresholds(**args)
    assert (full[0] == bisected[0]).all() and (full[1] == bisected[1]).all()
    assert (full[0][:, 2] == full[0][0, 2]).all() and abs(int(full[0][0, 2])) == fold_mod.BIG  # γ = 0: constant


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_pow2_accumulator_folds_exactly(tmp_path, backend):
    """pow2 × pow2 (3 bits, 64 channels in): |A| ≤ 9216 > FULL_RANGE, the bisection path, bit for bit."""
    model = level_block(3, "mixed", pool=True, w_bits=3, in_bits=3, cin=64)
    x = torch.randn(16, 64, 8, 8)
    with torch.no_grad():
        ref = model[-1].input_quantizer(model[:-1](x)).permute(0, 2, 3, 1).numpy()
    assert 2 * model[0].in_channels * 9 * 16 + 1 > fold_mod.FULL_RANGE
    assert (folded_planes(model, x, tmp_path / "w.bbpack", backend) == ref).all()


@pytest.mark.parametrize("w_bits,a_bits", [(2, 2), (3, 3)])
def test_trained_digits_net_with_running_statistics_folds_and_agrees(tmp_path, digits, w_bits, a_bits):  # noqa: F811
    torch.manual_seed(0)
    model = create_model("digits_net", num_classes=10, input_shape=digits.input_shape, w_bits=w_bits,
                         a_bits=a_bits, estimator=("aqe", {"act_stats": "running"}))
    train(model, digits, epochs=2)
    c = check_agreement(model, digits.test_x, every_sample=True)
    assert c["agreement"] == 1.0
    assert [layer["folded"] for layer in c["report"].layers] == [False, True, True, False]
    export_model(model, tmp_path / "n.bbpack")
    with PackedNet.load(tmp_path / "n.bbpack", threads=1, backend=BACKENDS[-1]) as other:
        assert (other.logits(digits.test_x.numpy()) == c["logits"]).all()  # the other backend, bit for bit


def test_unfolded_export_runs_the_same_numbers(tmp_path, digits):  # noqa: F811
    """``fold_levels=False`` keeps float32 BN + run-time quantizers; both layouts give identical logits."""
    torch.manual_seed(0)
    model = create_model("digits_net", num_classes=10, input_shape=digits.input_shape, w_bits=2, a_bits=3,
                         estimator=("aqe", {"act_stats": "running"}))
    estimators.calibrate_activation_stats(model, [digits.train_x[:256]])
    model.eval()
    folded = export_model(model, tmp_path / "f.bbpack")
    plain = export_model(model, tmp_path / "p.bbpack", fold_levels=False)
    assert [r["folded"] for r in folded.layers] == [False, True, True, False]
    assert not any(r["folded"] for r in plain.layers)
    assert all("steps" not in r for r in read_packed(tmp_path / "p.bbpack")[0]["layers"])  # readable as before
    x = digits.test_x.numpy()
    with PackedNet.load(tmp_path / "f.bbpack", threads=1) as f, PackedNet.load(tmp_path / "p.bbpack", threads=1) as p:
        assert (f.logits(x) == p.logits(x)).all()


@pytest.mark.parametrize("name", ["pow2_v2", "ternary_v2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_files_written_before_the_level_folds_still_run(name, backend):
    folder = Path(__file__).parent / "data" / "packed_v2"
    saved = np.load(folder / f"{name}_logits.npz")
    with PackedNet.load(folder / f"{name}.bbpack", threads=1, backend=backend) as net:
        assert [r.steps for r in net.header.layers] == [None] * 4
        assert [r.input.stats for r in net.header.layers[1:]] == ["constant"] * 3
        assert (net.logits(saved["x"]) == saved["logits"]).all()


def test_steps_next_to_float_first_and_last_layers(tmp_path, digits):  # noqa: F811
    """first_last_float: the middle layer folds into steps, the one before the float head stays float32."""
    torch.manual_seed(0)
    model = create_model("digits_net", num_classes=10, input_shape=digits.input_shape, w_bits=2, a_bits=3,
                         estimator=("aqe", {"act_stats": "running"}), first_last_float=True)
    estimators.calibrate_activation_stats(model, [digits.train_x[:256]])
    report = export_model(model, tmp_path / "h.bbpack")
    assert [r["folded"] for r in report.layers] == [False, True, False, False] and report.layers[-1]["w"] == "float"
    with PackedNet.load(tmp_path / "h.bbpack", threads=1) as net, torch.no_grad():
        ours, ref = net.logits(digits.test_x.numpy()), model(digits.test_x).numpy()
    assert (ours.argmax(1) == ref.argmax(1)).all() and np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_steps_that_do_not_fit_the_layer_are_refused(tmp_path):
    from workers.packed.format import write_packed

    model = level_block(3, "pos", pool=False)
    export_model(model, tmp_path / "s.bbpack")
    raw, arrays = read_packed(tmp_path / "s.bbpack")
    assert raw["layers"][0]["steps"]["levels"] == 3
    raw["layers"][0]["steps"]["levels"] = 2
    del raw["arrays"]
    write_packed(tmp_path / "bad.bbpack", raw, arrays)
    with pytest.raises(ValueError, match=r"steps arrays \(6, 16\), \(16,\) do not fit 2 levels × 16 outputs"):
        PackedNet.load(tmp_path / "bad.bbpack")

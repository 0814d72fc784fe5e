"""Packed export + numpy engine: bit-level kernels, exact folding, agreement with torch, sizes.

Tolerances: predictions must equal torch's eval-mode predictions on ≥ 99.9% of the test set;
logits within 1e-5·max(1, max|torch logit|) (float32 BN after an exact integer accumulator:
only last-ulp differences are expected; W1A1 nets have no run-time statistics, so every
sample must match; ternary/pow2 nets recompute Δ = 0.7·mean|x| / max|x| per sample in numpy,
which may round differently from torch's reduction, so ≥ 99% of samples must be within).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import estimators
from estimators import QConv2d, QLinear
from workers.datasets import load_dataset
from workers.models import create_model
from workers.packed import PackedNet, UnsupportedModelError, compare, export_checkpoint, export_model, packed_summary
from workers.packed.engine import quantize
from workers.packed.format import (
    Encoding,
    LayerRecord,
    PackedHeader,
    WeightArrays,
    load_packed,
    pack_bits,
    read_packed,
    save_packed,
    unpack_bits,
    write_packed,
)
from workers.packed.kernels import popcount_matmul

LOGIT_RTOL = 1e-5
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Train and compare with one torch thread: on 2 busy cores two threads are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- (c) bit level -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 7, 63, 64, 65, 130, 200])
def test_pack_bits_layout_and_roundtrip(k):
    bits = RNG.random((5, k)) < 0.5
    words = pack_bits(bits)
    assert words.dtype == np.uint64 and words.shape == (5, -(-k // 64))
    r, i = np.nonzero(bits)
    # bit k of a row sits in word k // 64 at bit k % 64
    assert ((words[r, i // 64] >> (i % 64).astype(np.uint64)) & np.uint64(1) == 1).all()
    assert int(np.bitwise_count(words).sum()) == int(bits.sum())  # padding bits are zero
    assert (unpack_bits(words, k) == bits).all()


def levels(enc: str, shape) -> np.ndarray:
    """Random integer levels: sign ±1, ternary {−1, 0, 1}, pow2 {0, ±1, ±2, ±4} (3 bits ×4)."""
    choice = {"sign": [-1, 1], "ternary": [-1, 0, 1], "pow2": [-4, -2, -1, 0, 1, 2, 4]}[enc]
    return RNG.choice(choice, size=shape).astype(np.int64)


@pytest.mark.parametrize("k", [1, 37, 64, 65, 129, 300])
@pytest.mark.parametrize("a_enc,w_enc", [("sign", "sign"), ("ternary", "ternary"), ("pow2", "pow2"),
                                         ("sign", "ternary"), ("ternary", "sign"), ("sign", "pow2"),
                                         ("pow2", "sign"), ("ternary", "pow2")])
def test_popcount_dot_products_equal_float_dot(k, a_enc, w_enc):
    """XNOR (K − 2·popcount(a ^ w)), ternary planes and SHIFT planes vs numpy float dot."""
    a, w = levels(a_enc, (23, k)), levels(w_enc, (9, k))
    expected = a.astype(np.float64) @ w.T.astype(np.float64)
    assert (popcount_matmul(a, w, a_enc, w_enc) == expected).all()


def test_popcount_all_zero_operands():
    a = np.zeros((3, 70), np.int64)
    assert (popcount_matmul(a, levels("sign", (4, 70)), "ternary", "sign") == 0).all()
    assert (popcount_matmul(levels("sign", (3, 70)), a[:2], "sign", "pow2") == 0).all()


def test_runtime_quantizers_match_torch():
    from estimators import quantizers as Qz

    z = torch.randn(6, 5, 4, 7).clamp(-1, 1)
    z[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1.0])
    zn = z.numpy()
    s = torch.tensor(0.4321)  # a frozen running estimate
    for enc, ref, const in [("sign", Qz.sign(z), {}), ("ternary", Qz.ternary(z, 0.7, dims="sample"), {}),
                            ("pow2", Qz.pow2(z, 3, dims="sample") * 4, {}),
                            ("ternary", Qz.ternary(z, 0.7, mean_abs=s), {"stats": "constant", "reference": float(s)}),
                            ("pow2", Qz.pow2(z, 3, max_abs=s) * 4, {"stats": "constant", "reference": float(s)})]:
        cfg = Encoding(enc, {"sign": 1, "ternary": 2, "pow2": 3}[enc], delta_ratio=0.7, thresholds=(0.02, 0.07, 0.14),
                       **const)
        op = quantize(zn, cfg)
        mag = np.ones(zn.shape) if op.masks is None else sum(m * 2**e for e, m in op.masks)
        assert (np.where(op.neg, -1, 1) * mag == ref.numpy()).all(), enc


# -- exact layers: padding, strides, im2col paths, folding --------------------------------------
def single_conv(cin, w_bits, a_bits, stride=1, padding=1):
    torch.manual_seed(cin + 10 * w_bits + a_bits)
    model = nn.Sequential(QConv2d(cin, 16, 3, stride, padding, w_bits=w_bits, a_bits=a_bits, estimator="aqe"))
    return estimators.calibrate_activation_stats(model, [torch.randn(8, cin, 9, 7)])


@pytest.mark.parametrize("cin", [3, 8, 64])  # bool / byte / word im2col
@pytest.mark.parametrize("w_bits,a_bits", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_conv_accumulator_is_exact(tmp_path, cin, w_bits, a_bits, stride, padding):
    """Zero padding of a ±1 input (encoded +1, corrected) and every input packing path: the
    engine's conv output equals torch's float32 conv exactly (integer sums are exact)."""
    model = single_conv(cin, w_bits, a_bits, stride, padding)
    x = torch.randn(3, cin, 9, 7)
    export_model(model, tmp_path / "c.bbpack")
    ours = PackedNet.load(tmp_path / "c.bbpack", threads=1)._forward(x.numpy())
    with torch.no_grad():
        ref = model(x).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape and (ours == ref).all()


def folded_block(gamma_sign: str):
    """sign-input conv → MaxPool → BN (integer means: exact ties BN = 0) → HT → sign conv."""
    torch.manual_seed(1)
    q = dict(w_bits=1, a_bits=1, estimator="aqe")
    bn = nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randint(-12, 13, (16,)).float())
        bn.running_var.uniform_(0.5, 4.0)
        sign = {"pos": 1.0, "neg": -1.0, "mixed": torch.tensor([1.0, -1.0] * 8)}[gamma_sign]
        bn.weight.copy_(torch.rand(16) * sign)
        bn.weight[3] = 0.0  # constant channel
        bn.bias.zero_()  # τ = μ: BN(A) = +0 exactly at A = μ → sign(+0) = +1
    return nn.Sequential(QConv2d(8, 16, 3, 1, 1, **q), nn.MaxPool2d(2), bn, nn.Hardtanh(),
                         QConv2d(16, 4, 3, 1, 1, **q)).eval()


@pytest.mark.parametrize("gamma_sign", ["pos", "neg", "mixed"])
def test_fold_threshold_with_pool_is_exact(tmp_path, gamma_sign):
    """sign(HT(BN(maxpool(A)))) = OR-pool(A ≥ U) XOR g, γ < 0 and γ = 0 included, bit for bit."""
    model = folded_block(gamma_sign)
    x = torch.randn(16, 8, 8, 8)
    export_model(model, tmp_path / "f.bbpack")
    net = PackedNet.load(tmp_path / "f.bbpack", threads=1)
    assert net.header.layers[0].fold is not None and net.header.layers[1].fold is None
    op = net.layers[0](x.numpy().transpose(0, 2, 3, 1))
    with torch.no_grad():
        ref = model[4].input_quantizer(model[:4](x)).permute(0, 2, 3, 1).numpy()
    assert op.masks is None and op.bits == 16 and (np.where(unpack_bits(op.neg, 16), -1.0, 1.0) == ref).all()
    with torch.no_grad():
        assert (net._forward(x.numpy()) == model(x).permute(0, 2, 3, 1).numpy()).all()


# -- (a) agreement on trained nets ------------------------------------------------------------
def train(model, data, epochs: int, batch: int = 64, lr: float = 0.01):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        estimators.set_progress(model, epoch, epochs)
        model.train()
        for idx in torch.randperm(len(data.train_y), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            opt.step()
            estimators.clip_latent_weights(model)
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def check_agreement(model, x, *, every_sample: bool) -> dict:
    c = compare(model, x, threads=1)
    tol = LOGIT_RTOL * max(1.0, c["scale"])
    close = (np.abs(c["logits"] - c["torch_logits"]).max(axis=1) <= tol).mean()
    print(f"agreement {c['agreement']:.4f}  max|Δlogit| {c['max_abs_diff']:.2e} (tol {tol:.1e})  "
          f"samples within tol {close:.4f}  file {c['report'].file_bytes} B")
    assert c["agreement"] >= 0.999
    assert close == 1.0 if every_sample else close >= 0.99
    return c


@pytest.mark.parametrize("w_bits,a_bits,first_last_float,act_stats", [
    (2, 2, False, "running"), (3, 3, False, "running"), (2, 2, False, "per_sample"), (3, 3, False, "per_sample"),
    (1, 1, True, "running")])
def test_trained_digits_net_agrees(digits, w_bits, a_bits, first_last_float, act_stats):
    torch.manual_seed(0)
    model = create_model("digits_net", num_classes=10, input_shape=digits.input_shape, w_bits=w_bits,
                         a_bits=a_bits, estimator=("aqe", {"act_stats": act_stats}), first_last_float=first_last_float)
    train(model, digits, epochs=2)
    c = check_agreement(model, digits.test_x, every_sample=a_bits == 1)
    assert (c["logits"].argmax(1) == digits.test_y.numpy()).mean() > 0.5  # it did learn


def test_trained_w1a1_digits_checkpoint_agrees(tmp_path, digits):
    """A real trial (workers.train.run_trial, W1A1 AQE) exported from its last checkpoint."""
    from workers.spec import parse_spec
    from workers.train import build_model, run_trial

    spec = parse_spec({"name": "p", "dataset": "digits", "model": "digits_net", "estimators": ["aqe"],
                       "bits": [{"w": 1, "a": 1}], "epochs": 3, "batch_size": 64, "include_full_precision": False})
    trial = spec.trials()[0]
    states, checked = [], []

    def check(model, test_x, test_y):  # the packed check is a hook: the trainer imports no workers.packed
        checked.append(len(test_x))
        return packed_summary(model, test_x, test_y)

    final = run_trial(spec, trial, on_epoch=lambda m, s: states.append(s), threads=1, packed_check=check)
    assert checked == [len(digits.test_y)]  # digits: its whole test split is under PACKED_CHECK_SAMPLES
    report = export_checkpoint(states[-1], spec, trial, tmp_path / "t.bbpack", num_classes=10, input_shape=(1, 8, 8))
    model = build_model(spec, trial, digits)
    model.load_state_dict(states[-1]["model"])
    model.eval()
    ours = PackedNet.load(report.path, threads=1).predict(digits.test_x.numpy())
    with torch.no_grad():
        assert (ours == model(digits.test_x).argmax(1).numpy()).mean() >= 0.999
    assert abs((ours == digits.test_y.numpy()).mean() - final["final_test_acc"]) <= 0.001
    c = check_agreement(model, digits.test_x, every_sample=True)
    summary = packed_summary(model, digits.test_x, digits.test_y)
    assert set(summary) == {"packed_bytes", "packed_agreement"}
    assert summary["packed_bytes"] == c["report"].file_bytes and summary["packed_agreement"] >= 0.999
    assert (final["packed_bytes"], final["packed_agreement"]) == (summary["packed_bytes"], summary["packed_agreement"])


def test_run_trial_without_a_packed_check_reports_none_and_float_trials_are_not_checked():
    from workers.spec import parse_spec
    from workers.train import run_trial

    spec = parse_spec({"name": "p", "dataset": "digits", "model": "digits_net", "estimators": ["ste"],
                       "bits": [{"w": 1, "a": 1}], "epochs": 1, "batch_size": 256, "include_full_precision": True})
    low, full = sorted(spec.trials(), key=lambda t: t.is_float)
    final = run_trial(spec, low, on_epoch=lambda m, s: None, threads=1)
    assert final["packed_bytes"] is None and final["packed_agreement"] is None

    def refuse(*args):
        raise AssertionError("a float trial has no packed form to check")

    final = run_trial(spec, full, on_epoch=lambda m, s: None, threads=1, packed_check=refuse)
    assert final["packed_bytes"] is None and final["packed_agreement"] is None


def test_trained_convnet_d_agrees():
    data = load_dataset("synthetic", shape=(3, 32, 32), n_train=192, n_val=0, n_test=128, separation=0.3)
    torch.manual_seed(0)
    model = create_model("convnet_d", num_classes=10, input_shape=(3, 32, 32), w_bits=1, a_bits=1, estimator="aqe")
    train(model, data, epochs=1)
    c = check_agreement(model, data.test_x, every_sample=True)
    assert all(layer["folded"] for layer in c["report"].layers[1:-1])  # every hidden block is a threshold


@pytest.mark.parametrize("name,shape,w_bits,a_bits", [
    ("vgg_small", (3, 16, 16), 1, 1),  # head: linear with bias, no BN
    ("fashion_net", (1, 28, 28), 3, 2),  # max-pool right after the float-input conv
    ("digits_net", (1, 8, 8), 4, 4),  # 4-bit powers of two (codes 0..7)
    ("digits_net", (1, 8, 8), 32, 1),  # float weights, sign inputs
    ("digits_net", (1, 8, 8), 32, 3),  # float weights, powers-of-two inputs: dequantized planes (m_e·2^e)
])
def test_other_layouts_agree(name, shape, w_bits, a_bits):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, input_shape=shape, w_bits=w_bits, a_bits=a_bits, estimator="ste")
    estimators.calibrate_activation_stats(model, [torch.randn(16, *shape)])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.normal_(0, 3)
                m.running_var.uniform_(0.5, 20)
                m.weight.normal_()
            elif isinstance(m, QLinear) and m.bias is not None:
                m.bias.normal_()
    check_agreement(model, torch.randn(16, *shape), every_sample=True)


def test_threads_do_not_change_results(tmp_path):
    model = folded_block("mixed")
    x = np.random.default_rng(1).standard_normal((5, 8, 8, 8)).astype(np.float32)
    export_model(model, tmp_path / "m.bbpack")
    one, two = (PackedNet.load(tmp_path / "m.bbpack", threads=t).logits(x) for t in (1, 2))
    assert (one == two).all()


# -- (b) size ----------------------------------------------------------------------------------
def test_convnet_a_w1_size(tmp_path):
    """Model A at 1-bit weights: 10,352,000 weight bits = 1.234 MiB (paper 1.23 MiB)."""
    model = create_model("convnet_a", num_classes=10, input_shape=(3, 32, 32), w_bits=1, a_bits=1)
    r = export_model(model, tmp_path / "a.bbpack", input_shape=(3, 32, 32))
    assert r.weight_bits == 10_352_000 and round(r.weight_mib, 3) == 1.234 and r.float_weights == 0
    # rows pad to 64 bits: only the first conv (K = 27) pads, 128 × 37 bits
    assert r.payload_bytes * 8 == 10_352_000 + 128 * (64 - 27)
    assert r.float32_bytes == 4 * 10_352_000 and 31.9 < r.compression < 32
    print(f"\nconvnet_a W1: {r.weight_bits} weight bits = {r.weight_mib:.3f} MiB; payload {r.payload_bytes} B "
          f"({r.payload_mib:.3f} MiB, {r.compression:.2f}x vs float32); file {r.file_bytes} B "
          f"({r.file_compression:.2f}x)")
    assert r.payload_bytes < r.file_bytes < r.payload_bytes + 64 * 1024  # thresholds + header
    header, arrays = read_packed(r.path)
    assert header["format"] == "bitbench-packed" and header["input_shape"] == [3, 32, 32]
    assert sum(a.nbytes for n, a in arrays.items() if n.endswith(".neg")) == r.payload_bytes


def test_bits_per_weight_by_encoding(tmp_path):
    for bits, planes in [(1, 1), (2, 2), (3, 3)]:
        model = create_model("digits_net", num_classes=10, input_shape=(1, 8, 8), w_bits=bits, a_bits=bits)
        estimators.calibrate_activation_stats(model, [torch.randn(4, 1, 8, 8)])
        r = export_model(model, tmp_path / f"d{bits}.bbpack")
        words = sum(layer["out"] * layer["words"] for layer in r.layers)
        assert r.payload_bytes == 8 * words * planes and r.weight_bits == bits * r.quantized_weights


# -- format and refusals -----------------------------------------------------------------------
def test_layer_records_round_trip(tmp_path):
    """export → file → typed header: the same records; JSON ↔ record is lossless, constant input
    statistics (a frozen mean|x| / max|x| per layer) included, which the engine runs as torch does."""
    model = folded_block("mixed")
    model[4] = QConv2d(16, 4, 3, 1, 1, w_bits=3, a_bits=2, estimator="aqe",
                       estimator_params={"act_stats": "per_sample"})
    export_model(model.eval(), tmp_path / "r.bbpack", input_shape=(8, 8, 8))
    header, arrays = load_packed(tmp_path / "r.bbpack")
    raw, _ = read_packed(tmp_path / "r.bbpack")
    assert raw["version"] == 2 and header.input_shape == (8, 8, 8) and header.num_classes == 4
    first, second = header.layers
    assert first.conv and first.kernel == (3, 3) and first.fold is None and first.bn is not None  # next is ternary
    assert second.input == Encoding("ternary", 2, delta_ratio=0.7)
    assert second.weight.enc == "pow2" and second.weight.thresholds == (0.02, 0.07, 0.14) and second.weight.unit == 0.25
    assert len(second.weight_arrays.code) == 2 and second.a_max == 144 * 4
    assert PackedHeader.from_json(json.loads(json.dumps(header.to_json()))) == header
    frozen = dataclasses.replace(second, input=dataclasses.replace(second.input, stats="constant", reference=0.35))
    again = dataclasses.replace(header, layers=(first, frozen))
    save_packed(tmp_path / "c.bbpack", again, arrays)
    assert load_packed(tmp_path / "c.bbpack")[0] == again
    x = torch.randn(8, 8, 8, 8)
    frozen_model = nn.Sequential(*model[:4], QConv2d(16, 4, 3, 1, 1, w_bits=3, a_bits=2, estimator="aqe")).eval()
    frozen_model[4].load_state_dict(model[4].state_dict(), strict=False)
    frozen_model[4].input_quantizer.quantizer.running_stat.fill_(0.35)
    frozen_model[4].input_quantizer.quantizer.running_stat_set.fill_(True)
    with torch.no_grad():
        ref = frozen_model(x).permute(0, 2, 3, 1).numpy()
    ours = PackedNet.load(tmp_path / "c.bbpack", threads=1)._forward(x.numpy())
    assert (ours == ref).all()


@pytest.mark.parametrize("change,match", [
    (lambda h: {**h, "version": 3}, "version 3 is not supported"),
    (lambda h: {**h, "format": "onnx"}, "not 'bitbench-packed'"),
    (lambda h: {**h, "layers": [{**h["layers"][0], "kind": "pool"}]}, "unknown layer kind"),
    (lambda h: {**h, "layers": [{**h["layers"][0], "colour": 1}]}, "malformed version-2 layer record"),
    (lambda h: {**h, "layers": [{**h["layers"][0], "input": {**h["layers"][0]["input"], "enc": "int8"}}]},
     "unknown encoding 'int8'"),
])
def test_bad_headers_are_refused(change, match):
    fc = LayerRecord(name="fc", kind="linear", fan_in=64, out=10, K=64, words=1, input=Encoding("sign", 1),
                     weight=Encoding("sign", 1), weight_arrays=WeightArrays(neg="w"), unit=1.0, a_max=64)
    good = json.loads(json.dumps(PackedHeader((fc,), num_classes=10).to_json()))
    assert PackedHeader.from_json(good).layers == (fc,)
    with pytest.raises(ValueError, match=match):
        PackedHeader.from_json(change(good))


def test_version_1_files_are_still_read():
    """A file written by issue 7's exporter (untyped records, version 1) runs to the same logits."""
    folder = Path(__file__).parent / "data" / "packed_v1"
    raw, _ = read_packed(folder / "mixed_v1.bbpack")
    assert raw["version"] == 1 and "weight_arrays" not in raw["layers"][0]
    saved = np.load(folder / "mixed_v1_logits.npz")
    net = PackedNet.load(folder / "mixed_v1.bbpack", threads=1)
    assert [r.fold is not None for r in net.header.layers] == [False, True, False, False, False]
    assert [(r.input.enc, r.weight.enc) for r in net.header.layers] == [
        ("float", "sign"), ("sign", "sign"), ("sign", "ternary"), ("ternary", "pow2"), ("pow2", "ternary")]
    assert (net.logits(saved["x"]) == saved["logits"]).all()


def test_file_roundtrip_and_magic(tmp_path):
    arrays = {"a": np.arange(5, dtype=np.uint64), "b": np.ones((2, 3), np.float32)}
    size = write_packed(tmp_path / "x", {"layers": []}, arrays)
    assert size == (tmp_path / "x").stat().st_size and size % 64 == 0
    header, back = read_packed(tmp_path / "x")
    assert all((back[k] == v).all() and back[k].dtype == v.dtype for k, v in arrays.items())
    (tmp_path / "y").write_bytes(b"not a packed file")
    with pytest.raises(ValueError, match="not a bitbench packed file"):
        read_packed(tmp_path / "y")


MINW_FAMILY = {"aqe", "ste", "clipped_ste", "approx_sign", "ede", "reste"}


def test_estimators_declare_their_packed_encoding():
    """MINW-Net's unscaled quantizers declare sign / ternary / pow2 by bit width, xnor for its
    activations only (its weights carry a scale); every other estimator declares none."""
    minw = {1: "sign", 2: "ternary", 3: "pow2", 4: "pow2"}
    for name in estimators.list_estimators():
        for role in ("weight", "activation"):
            for bits in (1, 2, 3, 4):
                got = estimators.create_estimator(name, bits, role).packed_encoding()
                packable = name in MINW_FAMILY or (name == "xnor" and role == "activation")
                assert got == (minw[bits] if packable else None), (name, role, bits)


def test_per_batch_and_never_estimated_running_statistics_are_refused(tmp_path):
    """Per-batch activation statistics have no packed code (a prediction depends on its batch); a running
    estimate that was never set (an untrained model: eval takes each batch's) is refused too."""
    def model(stats):
        return create_model("digits_net", num_classes=10, input_shape=(1, 8, 8), w_bits=2, a_bits=2,
                            estimator=("aqe", {"act_stats": stats}))
    export_model(model("per_sample"), tmp_path / "ok.bbpack")
    with pytest.raises(UnsupportedModelError, match="activation statistics 'per_batch' have no packed code"):
        export_model(model("per_batch"), tmp_path / "no.bbpack")
    with pytest.raises(UnsupportedModelError, match="running activation statistic was never estimated"):
        export_model(model("running"), tmp_path / "no.bbpack")


def test_running_statistics_are_exported_as_the_layers_constant(tmp_path, digits):
    """act_stats=running: each quantized input's Δ (ternary) / max|x| (pow2) is the frozen estimate, written to
    the file as ``stats="constant"`` with the estimate as ``reference``."""
    torch.manual_seed(0)
    model = create_model("digits_net", num_classes=10, input_shape=digits.input_shape, w_bits=3, a_bits=2,
                         estimator=("aqe", {"act_stats": "running"}))
    model.train()
    with torch.no_grad():
        model(digits.train_x[:128])
    model.eval()
    report = export_model(model, tmp_path / "r.bbpack")
    header, _ = read_packed(report.path)
    quantizers = [m for m in model.modules() if getattr(m, "tracks_running_stat", False)]
    inputs = [rec["input"] for rec in header["layers"] if rec["input"]["enc"] == "ternary"]
    assert len(inputs) == len(quantizers) >= 2
    for rec, q in zip(inputs, quantizers, strict=True):
        assert rec["stats"] == "constant" and rec["reference"] == float(q.running_stat) > 0



def test_xnor_activations_with_float_weights_are_packed(digits):
    torch.manual_seed(0)
    model = create_model("digits_net", num_classes=10, input_shape=(1, 8, 8), w_bits=32, a_bits=1, estimator="xnor")
    c = check_agreement(model.eval(), digits.test_x[:64], every_sample=True)
    assert [(r["a"], r["w"]) for r in c["report"].layers] == [("float", "float")] + [("sign", "float")] * 3


@pytest.mark.parametrize("name,kw,match", [
    ("resnet20", {"estimator": "aqe"}, "own forward"),
    ("digits_net", {"estimator": "xnor"}, "xnor"),
    ("digits_net", {"estimator": "dorefa", "w_bits": 2, "a_bits": 2}, "dorefa"),
    ("digits_net", {"estimator": ("xnor", {"scale": "twn"}), "w_bits": 2, "a_bits": 32}, "xnor"),
    ("digits_net", {"estimator": "hwgq", "w_bits": 1, "a_bits": 2}, "hwgq"),
    ("digits_net", {"estimator": "lq_nets", "w_bits": 2, "a_bits": 2}, "lq_nets"),
])
def test_unsupported_models_are_refused(tmp_path, digits, name, kw, match):
    shape = (1, 8, 8) if name == "digits_net" else (3, 32, 32)
    model = create_model(name, num_classes=10, input_shape=shape, **{"w_bits": 1, "a_bits": 1, **kw})
    with pytest.raises(UnsupportedModelError, match=match):
        export_model(model, tmp_path / "u.bbpack")
    if name == "digits_net":
        assert packed_summary(model, digits.test_x[:8], digits.test_y[:8]) == {"packed_bytes": None,
                                                                              "packed_agreement": None}


def packed_and_torch_outputs(model, tmp_path, input_shape, n):
    """The exported engine's last-layer output and torch's eval output (NHWC) on n random images."""
    model.eval()
    export_model(model, tmp_path / "m.bbpack", input_shape=input_shape)
    x = torch.randn(n, *input_shape)
    with torch.no_grad():
        ref = model(x).permute(0, 2, 3, 1).numpy()
    return PackedNet.load(tmp_path / "m.bbpack", threads=1)._forward(x.numpy()), ref


@pytest.mark.parametrize("a_bits", [2, 3])
def test_conv_bias_then_max_pool_runs_in_float_as_torch_does(tmp_path, a_bits):
    """A conv with a bias before its max-pool: z = maxpool(s·A + b), pooled after the bias, in float32
    (the next quantizer per sample, so nothing is folded), equal to torch's eval output bit for bit."""
    torch.manual_seed(5)
    q = dict(estimator="aqe", estimator_params={"act_stats": "per_sample"})
    model = nn.Sequential(QConv2d(8, 16, 3, 1, 1, bias=True, w_bits=2, a_bits=1, **q), nn.MaxPool2d(2),
                          nn.BatchNorm2d(16), nn.Hardtanh(), QConv2d(16, 4, 3, 1, 1, w_bits=2, a_bits=a_bits, **q))
    with torch.no_grad():
        model[0].bias.normal_(0, 2)
        model[2].running_mean.normal_(0, 2)
        model[2].running_var.uniform_(1, 10)
    got, ref = packed_and_torch_outputs(model, tmp_path, (8, 8, 8), 6)
    assert (got == ref).all()


@pytest.mark.parametrize("a_bits", [1, 2])
def test_non_square_kernels_with_padding_agree_with_torch(tmp_path, a_bits):
    """3×1 and 1×3 kernels, padded: the padded taps' correction counts kh·kw taps per output (Σ_c w per tap)."""
    torch.manual_seed(6)
    q = dict(estimator="aqe", estimator_params={"act_stats": "per_sample"})
    model = nn.Sequential(QConv2d(4, 8, (3, 1), 1, (1, 0), w_bits=1, a_bits=a_bits, **q),
                          nn.BatchNorm2d(8), nn.Hardtanh(),
                          QConv2d(8, 4, (1, 3), (1, 2), (0, 1), w_bits=2, a_bits=a_bits, **q))
    with torch.no_grad():
        model[1].running_mean.normal_(0, 1)
        model[1].running_var.uniform_(1, 4)
    got, ref = packed_and_torch_outputs(model, tmp_path, (4, 6, 7), 5)
    assert got.shape == ref.shape == (5, 6, 4, 4) and (got == ref).all()

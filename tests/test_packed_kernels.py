"""The packed engine's kernels: the compiled (numba) path equals the numpy path bit for bit.

Random packed operands with odd lengths (K and C not multiples of 64: padding bits in the last
word), every encoding pair, odd feature maps for pooling, several thread counts; then whole nets
(logits identical). Also: the numpy fallback when numba cannot be imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import estimators
from estimators import QConv2d, QLinear
from workers.models import create_model
from workers.packed import PackedNet, export_model
from workers.packed.format import pack_bits, unpack_bits
from workers.packed.kernels import BACKENDS, Kernels, Planes, code_numpy, encode_ints, popcount_matmul, weight_planes

pytest.importorskip("numba")
RNG = np.random.default_rng(7)
LEVELS = {"sign": [-1, 1], "ternary": [-1, 0, 1], "pow2": [-4, -2, -1, 0, 1, 2, 4]}
ENC_PAIRS = [("sign", "sign"), ("ternary", "ternary"), ("pow2", "pow2"), ("sign", "ternary"), ("ternary", "sign"),
             ("sign", "pow2"), ("pow2", "sign"), ("ternary", "pow2"), ("pow2", "ternary")]


@pytest.fixture(autouse=True)
def split_small_work(monkeypatch):
    """Split even these small inputs over the threads, so that two threads do run the chunked path."""
    monkeypatch.setattr("workers.packed.kernels.MIN_CHUNK_WORK", 1)


@pytest.fixture(scope="module")
def kernels():
    """numba and numpy kernels at one and two threads."""
    ks = {(b, t): Kernels(b, threads=t) for b in ("numba", "numpy") for t in (1, 2)}
    yield ks
    for k in ks.values():
        k.close()


def levels(enc, shape):
    return RNG.choice(LEVELS[enc], size=shape).astype(np.int64)


def all_equal(results: dict) -> bool:
    first = next(iter(results.values()))
    return all(v.dtype == first.dtype and v.shape == first.shape and (v == first).all() for v in results.values())


def test_numba_is_the_default_backend():
    assert BACKENDS == ("numba", "numpy") and Kernels().backend == "numba"
    with pytest.raises(ValueError, match="kernel backend 'cuda' is not available here; available: numba, numpy"):
        Kernels("cuda")


@pytest.mark.parametrize("k", [1, 37, 63, 64, 65, 129, 300])
@pytest.mark.parametrize("a_enc,w_enc", ENC_PAIRS)
def test_accumulate_numba_equals_numpy_and_the_integer_dot(kernels, k, a_enc, w_enc):
    a, w = levels(a_enc, (29, k)), levels(w_enc, (11, k))
    rows, planes = kernels["numpy", 1].pack(encode_ints(a, a_enc)), weight_planes(w, w_enc)
    corr = RNG.integers(-50, 50, (29, 11)).astype(np.int32)  # a correction per row (period = all rows)
    got = {key: kern.accumulate(rows, planes, corr) for key, kern in kernels.items()}
    assert all_equal(got)
    assert (got["numba", 1] == a @ w.T - corr).all()
    packed_by_numba = kernels["numba", 1].pack(encode_ints(a, a_enc))
    assert (packed_by_numba.neg == rows.neg).all() and packed_by_numba.bits == rows.bits == k


def test_shift_groups_pair_planes_by_the_sum_of_their_shifts():
    from workers.packed.jit import shift_groups

    # shifts 0, 1, 2 on both sides: sums 0..4 with 1, 2, 3, 2, 1 pairs
    assert shift_groups((0, 1, 2), (0, 1, 2)) == ((0, 1, 2, 3, 4), (0, 0, 1, 0, 1, 2, 1, 2, 2),
                                                  (0, 1, 0, 2, 1, 0, 2, 1, 2), (0, 1, 3, 6, 8, 9))
    assert shift_groups((), (0, 2)) == ((0, 2), (0, 0), (0, 1), (0, 1, 2))  # dense ±1 activations
    assert shift_groups((0,), ()) == ((0,), (0,), (0,), (0, 1))


@pytest.mark.parametrize("a_levels,w_levels", [([-4, -2, 2, 4], [-4, 0, 1, 4]),   # shifts (1, 2) × (0, 2)
                                               ([-1, 0, 4], [-2, 0, 2, 4]),       # (0, 2) × (1, 2)
                                               ([-4, 0, 4], [-1, 1, 0, -4])])     # (2,) × (0, 2)
def test_pow2_operands_with_missing_levels_group_their_shifts_correctly(kernels, a_levels, w_levels):
    """Plane pairs of one shift sum are merged before the popcount; levels absent on a side change which
    pairs share a sum (e.g. 1 + 2 and 2 + 1 but no 1 + 1), and the result must not."""
    a = RNG.choice(a_levels, size=(23, 150)).astype(np.int64)
    w = RNG.choice(w_levels, size=(9, 150)).astype(np.int64)
    rows, planes = kernels["numpy", 1].pack(encode_ints(a, "pow2")), weight_planes(w, "pow2")
    for key in [("numba", 1), ("numba", 2), ("numpy", 1)]:
        assert (kernels[key].accumulate(rows, planes) == a @ w.T).all(), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_operands_give_zero(backend):
    zero = np.zeros((3, 70), np.int64)
    assert (popcount_matmul(zero, levels("sign", (4, 70)), "ternary", "sign", backend) == 0).all()
    assert (popcount_matmul(levels("sign", (3, 70)), zero[:2], "sign", "pow2", backend) == 0).all()


@pytest.mark.parametrize("c", [1, 3, 8, 24, 32, 63, 64, 65, 130])
@pytest.mark.parametrize("geom", [((3, 3), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 2), (0, 1)),
                                  ((1, 1), (1, 1), (0, 0)), ((5, 4), (1, 1), (0, 0))])
def test_gather_numba_equals_numpy(kernels, c, geom):
    """im2col of packed pixels, with the bits of consecutive taps running across word boundaries."""
    bits = RNG.random((3, 5, 4, c)) < 0.5
    op = Planes(pack_bits(bits), [(0, pack_bits(RNG.random((3, 5, 4, c)) < 0.5))], c)
    got = {key: kern.gather(op, *geom) for key, kern in kernels.items()}
    assert all_equal({k: v.neg for k, v in got.items()}) and all_equal({k: v.masks[0][1] for k, v in got.items()})
    # the rows are the bool im2col, packed
    from workers.packed.kernels import im2col

    ref = pack_bits(im2col(bits, *geom)).reshape(-1, got["numba", 1].neg.shape[1])
    assert (got["numba", 1].neg == ref).all() and got["numba", 1].bits == geom[0][0] * geom[0][1] * c


@pytest.mark.parametrize("n_out", [1, 10, 63, 64, 65, 130])
@pytest.mark.parametrize("pool", [None, 2, 3])
def test_threshold_numba_equals_numpy(kernels, n_out, pool):
    """(max-pooled A ≥ U) XOR g → packed sign bits, on 7×5 maps (floor mode drops the last row/column)."""
    acc = RNG.integers(-20, 20, (4, 7, 5, n_out)).astype(np.int32)
    u = RNG.integers(-10, 10, n_out).astype(np.int32)
    g = RNG.random(n_out) < 0.5
    got = {key: kern.threshold(acc, u, g, pool) for key, kern in kernels.items()}
    assert all_equal(got)
    k = pool or 1
    top = acc[:, : 7 // k * k, : 5 // k * k].reshape(4, 7 // k, k, 5 // k, k, n_out).max(axis=(2, 4))
    assert (unpack_bits(got["numba", 1], n_out) == ((top >= u) == g)).all()
    flat = {key: kern.threshold(acc[:, 0, 0], u, g, None) for key, kern in kernels.items()}  # linear outputs
    assert all_equal(flat) and flat["numba", 1].shape == (4, -(-n_out // 64))


@pytest.mark.parametrize("n_out", [1, 10, 64, 65, 130])
@pytest.mark.parametrize("pool", [None, 2, 3])
@pytest.mark.parametrize("levels", [1, 3, 7])
def test_steps_numba_equal_numpy(kernels, n_out, pool, levels):
    """Level folds: ℓ = ±(#{i : max-pooled A ≥ t_i} − q) → packed sign and |ℓ| = e + 1 planes, thresholds
    with ties, ±BIG (unreachable / always reached) and falling channels (g)."""
    acc = RNG.integers(-20, 20, (4, 7, 5, n_out)).astype(np.int32)
    t = np.sort(RNG.integers(-22, 22, (2 * levels, n_out)), axis=0).astype(np.int32)
    t[0, ::3], t[-1, 1::3] = -2**30, 2**30
    g = RNG.random(n_out) < 0.5
    got = {key: kern.steps(acc, t, g, pool) for key, kern in kernels.items()}
    for i in range(1 + levels):
        assert all_equal({key: np.asarray(([op.neg] + [p for _, p in op.masks])[i]) for key, op in got.items()})
    k = pool or 1
    top = acc[:, : 7 // k * k, : 5 // k * k].reshape(4, 7 // k, k, 5 // k, k, n_out).max(axis=(2, 4))
    c = (top[..., None, :] >= t).sum(axis=-2)
    level = np.where(g, levels - c, c - levels)
    op = got["numba", 1]
    assert [e for e, _ in op.masks] == list(range(levels)) and op.bits == n_out
    assert (unpack_bits(op.neg, n_out) == (level < 0)).all()
    for e, plane in op.masks:
        assert (unpack_bits(plane, n_out) == (np.abs(level) == e + 1)).all()
    flat = {key: kern.steps(acc[:, 0, 0], t, g, None) for key, kern in kernels.items()}  # linear outputs
    assert all_equal({key: op.neg for key, op in flat.items()}) and flat["numba", 1].neg.shape == (4, -(-n_out // 64))
    assert all_equal({key: op.masks[-1][1] for key, op in flat.items()})


@pytest.mark.parametrize("enc", ["sign", "ternary", "pow2"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (3, 4, 5, 64), (3, 2, 2, 130), (5, 67)])
def test_input_codes_numba_equal_numpy(kernels, enc, shape):
    z = RNG.standard_normal(shape).astype(np.float32)
    z.reshape(-1)[:4] = [0.0, -0.0, 1e-30, -1e-30]
    flat = np.abs(z).reshape(len(z), -1)
    stat = {"sign": None, "ternary": 0.7 * flat.mean(axis=1).astype(np.float32), "pow2": flat.max(axis=1)}[enc]
    thresholds = (0.02, 0.07, 0.14)
    got = {key: kern.code(z, enc, stat, thresholds) for key, kern in kernels.items()}
    assert all_equal({k: v.neg for k, v in got.items()})
    if enc != "sign":
        for i in range(len(got["numpy", 1].masks)):
            assert all_equal({k: v.masks[i][1] for k, v in got.items()})
    ref = code_numpy(z, enc, stat, thresholds)
    assert (unpack_bits(got["numba", 1].neg, shape[-1]) == ref.neg).all()


def _mixed_net():
    """Every layer kind the engine runs: float input, fold + pool, sign × ternary, ternary × pow2, pow2 head."""
    torch.manual_seed(3)
    q = dict(estimator="aqe")
    model = nn.Sequential(
        QConv2d(3, 16, 3, 1, 1, w_bits=1, a_bits=32, **q), nn.BatchNorm2d(16), nn.Hardtanh(),
        QConv2d(16, 20, 3, 1, 1, w_bits=1, a_bits=1, **q), nn.MaxPool2d(2), nn.BatchNorm2d(20), nn.Hardtanh(),
        QConv2d(20, 72, 3, 2, 1, w_bits=2, a_bits=1, **q), nn.BatchNorm2d(72), nn.Hardtanh(),
        QConv2d(72, 16, 3, 1, 0, w_bits=3, a_bits=2, **q), nn.BatchNorm2d(16), nn.Hardtanh(), nn.Flatten(),
        QLinear(16, 10, bias=True, w_bits=2, a_bits=3, **q))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 2)
                m.running_var.uniform_(1, 10)
                m.weight.normal_()
    return estimators.calibrate_activation_stats(model, [torch.randn(16, 3, 10, 11)]), (3, 10, 11)


@pytest.mark.parametrize("name,w_bits,a_bits", [("digits_net", 1, 1), ("digits_net", 2, 2), ("digits_net", 3, 3),
                                                ("digits_net", 4, 4), ("mixed", 0, 0)])
def test_whole_nets_give_identical_logits_on_both_backends(tmp_path, name, w_bits, a_bits):
    if name == "mixed":
        model, shape = _mixed_net()
    else:
        torch.manual_seed(0)
        shape = (1, 8, 8)
        model = create_model(name, num_classes=10, input_shape=shape, w_bits=w_bits, a_bits=a_bits, estimator="ste")
        estimators.calibrate_activation_stats(model, [torch.randn(16, *shape)])
    export_model(model, tmp_path / "m.bbpack")
    x = np.random.default_rng(0).standard_normal((37, *shape)).astype(np.float32)
    got, one = {}, {}
    for backend in ("numba", "numpy"):
        for threads in (1, 2):
            with PackedNet.load(tmp_path / "m.bbpack", threads=threads, backend=backend, micro_batch=16) as net:
                got[backend, threads] = net.logits(x)  # two threads: whole micro-batches per thread
                one[backend, threads] = net.logits(x[:1])  # one image: two threads split each kernel
    assert all_equal(got) and all_equal(one)
    with torch.no_grad():
        assert (got["numba", 1].argmax(1) == model(torch.from_numpy(x)).argmax(1).numpy()).mean() >= 0.9


def test_without_numba_the_numpy_kernels_run(tmp_path):
    """numba missing (an import that fails): the engine falls back to numpy and gives the same logits."""
    model, shape = _mixed_net()
    export_model(model, tmp_path / "m.bbpack")
    x = np.random.default_rng(1).standard_normal((5, *shape)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    with PackedNet.load(tmp_path / "m.bbpack", threads=1) as net:
        np.save(tmp_path / "numba.npy", net.logits(x))
    script = f"""
import sys
sys.modules["numba"] = None  # import numba → ImportError
import numpy as np
from workers.packed import PackedNet
from workers.packed.kernels import BACKENDS
assert BACKENDS == ("numpy",), BACKENDS
net = PackedNet.load(r"{tmp_path / 'm.bbpack'}", threads=1)
assert net.kernels.backend == "numpy"
assert (net.logits(np.load(r"{tmp_path / 'x.npy'}")) == np.load(r"{tmp_path / 'numba.npy'}")).all()
print("fallback ok")
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0 and "fallback ok" in out.stdout, out.stderr[-2000:]

"""Model registry: names, the paper's parameter capacity, shapes, gradients, bit placement."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import estimators
from estimators import Estimator, QConv2d, QLinear, UnknownNameError, weight_storage
from workers.models import create_model, list_models

MODELS = ["convnet_a", "convnet_b", "convnet_c", "convnet_d", "digits_net", "fashion_net", "resnet20", "vgg_small"]
# Input shapes each model is exercised with (all of them also work with any shape large enough).
SHAPES = {name: [(3, 32, 32), (1, 28, 28)] for name in MODELS}
SHAPES["digits_net"] = [(1, 8, 8)]
SHAPES["fashion_net"] = [(1, 28, 28)]
CASES = [(n, s) for n in MODELS for s in SHAPES[n]]

# (quantized weights at 1 bit, MiB, paper's printed "parameter capacity") — DESIGN.md §5.
CAPACITY = {
    "convnet_a": (10_352_000, 1.234, 1.23),
    "convnet_b": (4_562_624, 0.544, 0.54),
    "convnet_c": (2_591_424, 0.309, 0.30),
    "convnet_d": (1_802_432, 0.215, 0.21),
}
FIRST_CONV = {"convnet_a": 3 * 128 * 9}
FIRST_CONV.update(dict.fromkeys(["convnet_b", "convnet_c", "convnet_d"], 3 * 64 * 9))
LAST_FC = {"convnet_a": 1024 * 10, "convnet_b": 1024 * 10, "convnet_c": 512 * 10, "convnet_d": 256 * 10}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small nets and batches: one thread is as fast, and on a busy 2-core box far faster
    (two OpenMP threads waiting on each other made the digits run 15× slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qlayers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]


def test_registry_lists_models():
    assert list_models() == MODELS


def test_unknown_model_lists_known():
    with pytest.raises(UnknownNameError) as e:
        create_model("resnet9000")
    msg = str(e.value)
    assert "resnet9000" in msg and all(n in msg for n in MODELS)


def test_input_too_small_is_clear():
    with pytest.raises(ValueError, match="too small"):
        create_model("convnet_a", input_shape=(1, 8, 8))


@pytest.mark.parametrize("name", sorted(CAPACITY))
def test_parameter_capacity_matches_paper(name):
    weights, mib, printed = CAPACITY[name]
    s = weight_storage(create_model(name, w_bits=1, a_bits=1))
    assert (s.quantized_weights, s.float_weights, s.bits) == (weights, 0, weights)
    assert round(s.mib, 3) == mib
    assert math.floor(s.mib * 100) / 100 == pytest.approx(printed)  # the paper truncates
    # The layout by arithmetic: 6 convs (first unpadded: 32→30→15→7→3) and 3 FCs.
    width = 128 if name == "convnet_a" else 64
    convs = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    fc = LAST_FC[name] // 10
    expect = sum(9 * a * b for a, b in zip(convs, convs[1:])) + 4 * width * 9 * fc + fc * fc + fc * 10
    assert expect == weights
    # At 2 bits the same weights take twice the storage.
    assert weight_storage(create_model(name, w_bits=2, a_bits=2)).bits == 2 * weights


@pytest.mark.parametrize("name", sorted(CAPACITY))
def test_first_last_float_moves_first_and_last_weights_to_float(name):
    weights = CAPACITY[name][0]
    s = weight_storage(create_model(name, first_last_float=True))
    moved = FIRST_CONV[name] + LAST_FC[name]
    assert (s.quantized_weights, s.float_weights, s.bits) == (weights - moved, moved, weights - moved)
    layers = qlayers(create_model(name, first_last_float=True))
    assert (layers[0].w_bits, layers[0].a_bits) == (32, 32)
    assert (layers[-1].w_bits, layers[-1].a_bits) == (32, 32)
    assert all((m.w_bits, m.a_bits) == (1, 1) for m in layers[1:-1])


def test_weights_follow_input_shape():
    # 28×28 also ends at 3×3 (28→26→13→6→3); 3 classes shrink only the last FC.
    a28 = weight_storage(create_model("convnet_a", input_shape=(1, 28, 28), num_classes=3)).quantized_weights
    assert a28 == 10_352_000 - 2 * 128 * 9 - 1024 * 7
    # VGG-Small: 32→16→8→4, FC 512·4·4 → 10; ResNet-20: 0.27 M weights.
    assert weight_storage(create_model("vgg_small")).quantized_weights == 9 * (
        3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512) + 512 * 16 * 10
    res = 9 * (3 * 16 + 6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64) + 64 * 10
    assert weight_storage(create_model("resnet20")).quantized_weights == res == 268_336


@pytest.mark.parametrize("name,shape", CASES)
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=7, w_bits=1, a_bits=1, estimator="aqe")
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.square().sum().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert params
    for n, p in params:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for n, p in params if n.endswith("weight") and p.dim() > 1)


@pytest.mark.parametrize("name,shape", CASES)
def test_bit_placement(name, shape):
    fp = create_model(name, input_shape=shape, w_bits=32, a_bits=32)
    assert not any(isinstance(m, Estimator) for m in fp.modules())
    assert all((m.w_bits, m.a_bits) == (32, 32) for m in qlayers(fp))

    layers = qlayers(create_model(name, input_shape=shape, w_bits=1, a_bits=1))
    assert isinstance(layers[0], QConv2d) and layers[0].a_bits == 32  # raw image in
    assert layers[0].input_quantizer.quantizer is None
    assert all(m.a_bits == 1 for m in layers[1:])
    assert all(m.w_bits == 1 for m in layers)


@pytest.mark.parametrize("name,shape", CASES)
def test_eval_weights_are_binary(name, shape):
    model = create_model(name, input_shape=shape, w_bits=1, a_bits=1, estimator="aqe").eval()
    for m in qlayers(model):
        vals = torch.unique(m.quantized_weight().detach())
        assert set(vals.tolist()) <= {-1.0, 1.0}, m


def test_estimator_and_params_reach_every_layer():
    model = create_model("digits_net", input_shape=(1, 8, 8), w_bits=2, a_bits=3,
                         estimator=("aqe", {"backward": "alg1"}), estimator_params={"schedule": "linear"})
    layers = qlayers(model)
    quantizers = [q for m in layers for q in (m.weight_quantizer, m.input_quantizer.quantizer) if q is not None]
    assert len(quantizers) == 2 * len(layers) - 1  # every role but the first layer's input
    assert all(q.name == "aqe" and q.hparams["backward"] == "alg1" and q.hparams["schedule"] == "linear"
               for q in quantizers)
    assert {(q.role, q.bits) for q in quantizers} == {("weight", 2), ("activation", 3)}
    model.eval()
    for m in layers:  # 2-bit weights are ternary
        assert set(torch.unique(m.quantized_weight().detach()).tolist()) <= {-1.0, 0.0, 1.0}
    with pytest.raises(UnknownNameError, match="aqe"):
        create_model("digits_net", input_shape=(1, 8, 8), estimator="nope")


def test_digits_net_learns_real_digits():
    """W1A1 AQE digits_net on scikit-learn's 1,797 real 8×8 digits, 3 epochs of Adam lr 0.01.

    Chance is 0.1. Seen: 0.95–0.96 test accuracy over seeds 0–2 (in eval mode, i.e. with hard
    ±1 weights and activations), so 0.85 leaves room for run-to-run noise while a broken
    estimator (no gradient through the quantizers) or misplaced quantizer stays well below it.
    """
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 8 - 1
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    model = create_model("digits_net", input_shape=(1, 8, 8), w_bits=1, a_bits=1, estimator="aqe")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    epochs = 3
    for epoch in range(1, epochs + 1):
        estimators.set_progress(model, epoch, epochs)
        model.train()
        for idx in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            estimators.clip_latent_weights(model)
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.85, acc

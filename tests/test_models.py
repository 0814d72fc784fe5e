"""Model registry: names, the paper's parameter capacity, shapes, gradients, bit placement."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import estimators
from estimators import Estimator, QConv2d, QLinear, UnknownNameError, weight_storage
from workers.models import create_model, list_models

MODELS = ["alexnet_bn", "convnet_a", "convnet_b", "convnet_c", "convnet_d", "densenet100", "digits_net", "fashion_net",
          "resnet110", "resnet18", "resnet20", "vgg_small"]
# Input shapes each model is exercised with (all of them also work with any shape large enough).
SHAPES = {name: [(3, 32, 32), (1, 28, 28)] for name in MODELS}
SHAPES["digits_net"] = [(1, 8, 8)]
SHAPES["fashion_net"] = [(1, 28, 28)]
SHAPES["alexnet_bn"] = [(3, 67, 67)]  # the smallest input its three overlapping max-pools leave a pixel of
SHAPES["resnet110"] = SHAPES["densenet100"] = [(3, 32, 32)]
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
    expect = sum(9 * a * b for a, b in zip(convs, convs[1:], strict=False)) + 4 * width * 9 * fc + fc * fc + fc * 10
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


# -- the paper's larger networks (Tables III–V) ----------------------------------------------------------
def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def densenet_bc_params(depth: int, k: int, num_classes: int) -> int:
    """Huang et al.'s DenseNet-BC by arithmetic: stem 3×3 2k; per bottleneck on c channels BN(c), 1×1 c→4k,
    BN(4k), 3×3 4k→k; per transition BN(c), 1×1 c→c/2; head BN(c), FC c→classes with bias."""
    c = 2 * k
    total = 9 * 3 * c
    for block in range(3):
        for _ in range((depth - 4) // 6):
            total += 2 * c + c * 4 * k + 2 * 4 * k + 9 * 4 * k * k
            c += k
        if block < 2:
            total += 2 * c + c * (c // 2)
            c //= 2
    return total + 2 * c + c * num_classes + num_classes


def resnet110_params(num_classes: int) -> int:
    """He et al.'s CIFAR ResNet, n = 18, option-A shortcuts: 3×3 convs (stem, 36 per stage), 2 BN per
    block + the stem's, FC with bias."""
    convs = 3 * 16 + 36 * 16 * 16 + 16 * 32 + 35 * 32 * 32 + 32 * 64 + 35 * 64 * 64
    return 9 * convs + 2 * (16 + 36 * (16 + 32 + 64)) + 64 * num_classes + num_classes


def alexnet_bn_params(num_classes: int) -> int:
    """The authors' AlexNet-BN: 5 convs (k²·cin·cout), fc6 on 256·5·5, fc7, fc8, BN (2 per channel) everywhere."""
    convs = 121 * 3 * 64 + 25 * 64 * 192 + 9 * (192 * 384 + 384 * 384 + 384 * 256)
    fcs = 256 * 25 * 4096 + 4096 * 4096 + 4096 * num_classes
    return convs + fcs + 2 * (64 + 192 + 384 + 384 + 256 + 4096 + 4096 + num_classes)


# name: (classes, input shape, exact parameter count, the published count in millions as printed)
PUBLISHED = {
    "resnet110": (10, (3, 32, 32), 1_727_962, 1.7),  # He et al. 2016, Table 6 ("1.7M")
    "densenet100": (10, (3, 32, 32), 769_162, 0.8),  # Huang et al. 2017, Table 2, DenseNet-BC L=100 k=12 ("0.8M")
    "resnet18": (1000, (3, 224, 224), 11_689_512, 11.7),  # He et al. Table 1 / torchvision ("11.69M")
    "alexnet_bn": (1000, (3, 224, 224), 50_314_384, 50.3),  # the authors' alexnet_v2 layout (module docstring)
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    classes, shape, exact, published = PUBLISHED[name]
    model = create_model(name, num_classes=classes, input_shape=shape, w_bits=32, a_bits=32)
    assert n_params(model) == exact
    assert round(exact / 1e6, 1) == published
    # Quantizing changes no parameter count for estimators without learned parameters.
    assert n_params(create_model(name, num_classes=classes, input_shape=shape, w_bits=1, a_bits=1)) == exact


def test_counts_by_arithmetic_and_against_torchvision():
    import torchvision

    assert PUBLISHED["resnet110"][2] == resnet110_params(10)
    assert PUBLISHED["densenet100"][2] == densenet_bc_params(100, 12, 10)
    assert PUBLISHED["alexnet_bn"][2] == alexnet_bn_params(1000)
    assert PUBLISHED["resnet18"][2] == n_params(torchvision.models.resnet18())
    # CIFAR-100 changes only the classifier.
    assert n_params(create_model("densenet100", num_classes=100, w_bits=32, a_bits=32)) == \
        densenet_bc_params(100, 12, 100) == 800_032
    assert n_params(create_model("resnet110", num_classes=100, w_bits=32, a_bits=32)) == resnet110_params(100)


def test_resnet18_quantizes_its_projection_shortcuts_and_stem_like_the_first_layer():
    model = create_model("resnet18", num_classes=1000, input_shape=(3, 224, 224), w_bits=2, a_bits=1)
    layers = qlayers(model)
    # stem + 16 block convs + 3 projections + FC
    assert len(layers) == 21
    kernels = [tuple(m.weight.shape[2:]) for m in layers if isinstance(m, QConv2d)]
    assert kernels[0] == (7, 7) and kernels.count((1, 1)) == 3
    assert (layers[0].w_bits, layers[0].a_bits) == (2, 32)
    assert all((m.w_bits, m.a_bits) == (2, 1) for m in layers[1:])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


@pytest.mark.parametrize("name", ["alexnet_bn", "densenet100", "resnet110", "resnet18"])
def test_first_last_float_on_the_larger_networks(name):
    shape = SHAPES[name][0]
    layers = qlayers(create_model(name, input_shape=shape, first_last_float=True))
    assert (layers[0].w_bits, layers[0].a_bits) == (32, 32)
    assert isinstance(layers[-1], QLinear) and (layers[-1].w_bits, layers[-1].a_bits) == (32, 32)
    assert all((m.w_bits, m.a_bits) == (1, 1) for m in layers[1:-1])


@pytest.mark.parametrize("name,shape", [("alexnet_bn", (3, 66, 66)), ("densenet100", (3, 3, 3))])
def test_larger_networks_refuse_inputs_too_small(name, shape):
    with pytest.raises(ValueError, match="too small"):
        create_model(name, input_shape=shape)


def test_depths_outside_the_families_are_refused():
    from workers.models.blocks import QuantConfig
    from workers.models.densenet import DenseNet
    from workers.models.resnet import cifar_resnet

    with pytest.raises(ValueError, match="6n \\+ 2"):
        cifar_resnet(QuantConfig(), (3, 32, 32), 10, 100)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        DenseNet(QuantConfig(), (3, 32, 32), 10, depth=99)
    assert n_params(cifar_resnet(QuantConfig(32, 32), (3, 32, 32), 10, 20)) == \
        n_params(create_model("resnet20", w_bits=32, a_bits=32)) == 269_722


@pytest.mark.parametrize("name,shape", [("alexnet_bn", [3, 67, 67]), ("densenet100", [3, 8, 8]),
                                        ("resnet110", [3, 8, 8]), ("resnet18", [3, 16, 16])])
def test_larger_networks_train_one_epoch_through_run_trial(name, shape):
    """Full width, small images (seconds on a busy CPU): one epoch of W1A1 AQE on synthetic data through the
    real trainer."""
    from workers.spec import parse_spec
    from workers.train import run_trial

    spec = parse_spec({"name": name, "dataset": "synthetic", "model": name, "estimators": ["aqe"],
                       "bits": [{"w": 1, "a": 1}], "include_full_precision": False, "epochs": 1, "batch_size": 16,
                       "dataset_options": {"shape": shape, "num_classes": 10, "n_train": 32, "n_val": 16,
                                           "n_test": 16}})
    seen = []
    final = run_trial(spec, spec.trials()[0], on_epoch=lambda m, s: seen.append((m, s)), threads=1)
    (m, state), = seen
    assert math.isfinite(m["train_loss"]) and m["train_loss"] > 0
    assert 0 <= m["test_acc"] <= m["test_top5"] <= 1 and 0 <= m["val_acc"] <= 1
    assert m["weight_flips"] > 0  # the quantized weights moved
    assert final["weight_bits_total"] == estimators.weight_storage(
        create_model(name, input_shape=tuple(shape))).bits > 0

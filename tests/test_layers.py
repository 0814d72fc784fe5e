"""Quantized layers and the whole-model helpers; gradients flow on real data (digits)."""
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import estimators as E


def test_qconv2d_quantizes_input_and_weight():
    conv = E.QConv2d(2, 3, 3, padding=1, w_bits=1, a_bits=1, estimator="ste").eval()
    x = torch.randn(2, 2, 5, 5)
    want = nn.functional.conv2d(torch.where(x >= 0, 1.0, -1.0), torch.where(conv.weight >= 0, 1.0, -1.0), padding=1)
    torch.testing.assert_close(conv(x), want)


def test_layer_arguments_can_be_given_by_keyword():
    lin = E.QLinear(in_features=4, out_features=3, bias=True, w_bits=2, a_bits=2)
    assert lin.bias is not None and lin.bias.shape == (3,) and lin.weight.shape == (3, 4)
    assert E.QLinear(4, 3).bias is None


def test_32_bits_means_float():
    lin = E.QLinear(4, 3, w_bits=32, a_bits=32)
    assert lin.weight_quantizer is None and lin.input_quantizer.quantizer is None
    x = torch.randn(5, 4)
    torch.testing.assert_close(lin(x), x @ lin.weight.T)
    assert not any(isinstance(m, E.Estimator) for m in lin.modules())


def test_each_role_gets_its_own_learnable_parameters():
    lin = E.QLinear(4, 3, w_bits=2, a_bits=2, estimator=("lsq", {}))
    steps = [m.step for m in lin.modules() if isinstance(m, E.Estimator)]
    assert len(steps) == 2 and steps[0] is not steps[1]
    assert sum(1 for p in lin.parameters()) == 3  # weight + two steps


def test_estimator_params_reach_both_roles():
    conv = E.QConv2d(1, 1, 1, estimator=("aqe", {"backward": "alg1"}), estimator_params={"schedule": "linear"})
    for q in (conv.weight_quantizer, conv.input_quantizer.quantizer):
        assert q.hparams["backward"] == "alg1" and q.hparams["schedule"] == "linear"


def test_set_progress_reaches_every_estimator_and_reports_values():
    net = nn.Sequential(E.QLinear(3, 3, estimator="aqe"), E.QuantAct(1, "ede"), E.QLinear(3, 2, estimator="aqe"))
    values = E.set_progress(net, 5, 10)
    assert values["aqe.alpha"] == pytest.approx(0.5 * 2**0.5)
    assert values["ede.t"] == pytest.approx(1.0)
    assert all(m.epoch == 5 for m in net.modules() if isinstance(m, E.Estimator))


def test_clip_latent_weights_only_where_the_estimator_asks():
    a = E.QLinear(3, 3, estimator="aqe")
    d = E.QLinear(3, 3, estimator="dorefa")
    f = E.QLinear(3, 3, w_bits=32, a_bits=32)
    for layer in (a, d, f):
        nn.init.constant_(layer.weight, 3.0)
    assert E.clip_latent_weights(nn.Sequential(a, d, f)) == 1
    assert a.weight.max() == 1.0 and d.weight.max() == 3.0 and f.weight.max() == 3.0


def test_weight_storage_counts_bits():
    net = nn.Sequential(E.QConv2d(3, 8, 3, w_bits=1), E.QLinear(10, 4, w_bits=3), E.QLinear(4, 2, w_bits=32))
    s = E.weight_storage(net)
    assert (s.quantized_weights, s.float_weights) == (3 * 8 * 9 + 40, 8)
    assert s.bits == 216 + 3 * 40
    assert s.mib == pytest.approx(336 / 8 / 2**20)
    assert E.weight_storage(net, include_float=True).bits == 336 + 32 * 8


# -- gradients really flow: a W1A1 net on real digits ----------------------------------------------
def digits_tensors():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def tiny_net(estimator):
    q = dict(estimator=estimator, w_bits=1, a_bits=1)
    return nn.Sequential(
        E.QConv2d(1, 16, 3, padding=1, w_bits=1, a_bits=32, estimator=estimator), nn.BatchNorm2d(16), nn.Hardtanh(),
        E.QConv2d(16, 32, 3, padding=1, **q), nn.MaxPool2d(2), nn.BatchNorm2d(32), nn.Hardtanh(),
        nn.Flatten(), E.QLinear(32 * 16, 10, **q), nn.BatchNorm1d(10),
    )


# Chance is 10%. A W1A1 net that learns nothing stays near it; 85% after 6 epochs on 1,400 images
# cannot happen by luck (397 test images: 10% ± 1.5% std), and every estimator clears it easily
# when its gradients are right (93–97% measured), while a zero or wrong-signed gradient does not.
BAR = 0.85


@pytest.mark.slow
@pytest.mark.parametrize("name", E.list_estimators())
def test_w1a1_net_learns_digits(name):
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_tensors()
    net = tiny_net(name)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    epochs = 6
    for epoch in range(1, epochs + 1):
        E.set_progress(net, epoch, epochs)
        net.train()
        for idx in torch.randperm(len(ytr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xtr[idx]), ytr[idx]).backward()
            opt.step()
            E.clip_latent_weights(net)
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    assert acc > BAR, f"{name}: test accuracy {acc:.3f}"


def test_learned_values_are_reported_per_role_schedules_per_estimator():
    net = nn.Sequential(E.QLinear(3, 3, w_bits=2, a_bits=2, estimator="lsq"), E.QLinear(3, 2, estimator="aqe"))
    net(torch.randn(4, 3))  # LSQ sets its steps from the first batch
    values = E.schedule_values(net)
    assert set(values) == {"lsq.weight.step", "lsq.activation.step", "aqe.alpha"}
    assert values["lsq.weight.step"] == pytest.approx(float(net[0].weight_quantizer.step))



def test_training_forward_runs_the_soft_estimators_mix_and_calibration_restores_batchnorm():
    """model_tools.training_forward: AQE computes its training mix (not its hard Q) inside, the rest as in eval;
    calibrate_activation_stats puts each BatchNorm's momentum back."""
    torch.manual_seed(0)
    net = nn.Sequential(E.QLinear(6, 5, w_bits=32, a_bits=1, estimator="aqe"), nn.BatchNorm1d(5, momentum=0.3))
    E.set_progress(net, 1, 4)  # α < 1: the mix differs from Q
    x = torch.randn(8, 6)
    (aqe,) = E.soft_estimators(net)
    with torch.no_grad():
        hard = net.eval()(x)
        with E.training_forward(net) as soft:
            mixed = net(x)
        want = net[1](torch.nn.functional.linear(aqe.train_forward(x), net[0].weight))
    assert soft and not net.training and not torch.equal(mixed, hard)
    torch.testing.assert_close(mixed, want)
    mean, var = net[1].running_mean.clone(), net[1].running_var.clone()
    E.calibrate_activation_stats(net, [x])
    assert net[1].momentum == 0.3
    assert torch.equal(net[1].running_mean, mean) and torch.equal(net[1].running_var, var)  # momentum 0 inside


def test_layers_default_to_w1a1_and_convolutions_to_no_padding_as_torchs():
    lin, conv = E.QLinear(4, 2), E.QConv2d(3, 4, 3)
    assert (lin.w_bits, lin.a_bits) == (conv.w_bits, conv.a_bits) == (1, 1) and E.QuantAct().bits == 1
    assert conv.padding == nn.Conv2d(3, 4, 3).padding == (0, 0)
    assert conv(torch.randn(1, 3, 5, 5)).shape == (1, 4, 3, 3)


def test_latent_weights_are_clipped_to_the_unit_interval_where_the_estimator_asks():
    lin, free = E.QLinear(4, 3, w_bits=1, estimator="aqe"), E.QLinear(4, 3, w_bits=2, estimator="lsq")
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-5, 5, 12).reshape(3, 4))
        free.weight.copy_(torch.linspace(-5, 5, 12).reshape(3, 4))
    assert E.clip_latent_weights(nn.Sequential(lin, free)) == 1  # LSQ learns its step: no clip
    assert lin.weight.min() == -1.0 and lin.weight.max() == 1.0 and free.weight.abs().max() == 5.0


@pytest.mark.parametrize("name, bits", [("aqe", 3), ("xnor", 1), ("xnor", 2)])
def test_weight_levels_are_the_positions_of_the_unscaled_levels(name, bits):
    """hard(w) = scale·level: the index is level's position in level_set(); a scale of exactly 1 included."""
    torch.manual_seed(1)
    layer = E.QLinear(16, 4, w_bits=bits, estimator=name)
    with torch.no_grad():
        layer.weight.uniform_(-1, 1).pow_(3)  # many small weights: every level of 3-bit powers of two
        layer.weight[0] = torch.tensor([1.0, -1.0] * 8)  # mean|w| = 1: XNOR's scale is exactly 1
    q = layer.weight_quantizer
    hard, scale = q.hard(layer.weight), q.scale(layer.weight)
    level = hard if scale is None else hard / scale
    want = (level.unsqueeze(-1) - q.level_set().to(level.dtype)).abs().argmin(-1)
    (got,) = E.weight_levels(layer)
    assert torch.equal(got.long(), want) and len(set(got.flatten().tolist())) >= min(bits + 1, 3)


def test_a_filter_of_zeros_sits_on_the_zero_level_though_its_scale_is_zero():
    layer = E.QLinear(8, 3, w_bits=2, estimator="xnor")  # ternary × mean|w| per filter: scale 0 for a zero filter
    with torch.no_grad():
        layer.weight[0] = 0
    assert layer.weight_quantizer.scale(layer.weight)[0].item() == 0
    zero = layer.weight_quantizer.level_set().tolist().index(0.0)
    assert E.weight_levels(layer)[0][0].tolist() == [zero] * 8

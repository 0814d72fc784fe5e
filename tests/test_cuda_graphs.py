"""Training steps through a captured CUDA graph (workers/cuda_graphs.py): used only where it can be, and on a
GPU the same training as the eager steps, bit for bit, with no host sync in the captured estimators."""
from __future__ import annotations

import logging
from contextlib import nullcontext

import pytest
import torch

import estimators as E
from workers.cuda_graphs import MIN_BATCHES, graphed_forward, graphs_usable
from workers.data.loader import DeviceLoader
from workers.models import trial_model
from workers.spec import parse_spec
from workers.train import build_optimizer, deterministic, run_trial, train_epoch

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: the estimators whose CUDA paths make no host sync: the MINW-Net family (tested on CUDA in test_fused_minw)
#: and HWGQ (an XNOR subclass: its activations are a table lookup, bucketize and index)
CAPTURED = {"ste", "clipped_ste", "aqe", "approx_sign", "ede", "reste", "xnor", "hwgq"}


def net(estimator="aqe", bits: int | None = 2, model="convnet_d"):
    """(spec, model) of ``estimator`` at W``bits``A``bits``, or of the float network for bits None."""
    s = parse_spec({"name": "g", "dataset": "synthetic", "model": model, "estimators": [estimator],
                    "bits": [{"w": bits or 1, "a": bits or 1}], "include_full_precision": bits is None})
    return s, trial_model(s, s.trials()[-1], num_classes=10, input_shape=(3, 32, 32))


# -- where graphs are used (any machine) ---------------------------------------------------------------
def test_the_estimators_that_can_be_captured():
    assert {n for n in E.list_estimators() if E.get_estimator_class(n).cuda_graphs} == CAPTURED


def test_graphs_are_used_only_on_cuda_with_capturable_estimators_and_enough_batches(monkeypatch):
    monkeypatch.delenv("BITBENCH_CUDA_GRAPHS", raising=False)
    _, model = net()
    assert not graphs_usable(model, CUDA, 1000)  # off unless asked for (BITBENCH_CUDA_GRAPHS=1)
    monkeypatch.setenv("BITBENCH_CUDA_GRAPHS", "1")
    assert graphs_usable(model, CUDA, MIN_BATCHES)  # decided without touching the device
    assert not graphs_usable(model, torch.device("cpu"), 1000)
    assert not graphs_usable(model, CUDA, MIN_BATCHES - 1)  # a capture costs more than it saves
    assert not graphs_usable(net("lsq")[1], CUDA, 1000)  # LSQ reads its step's value on the host
    assert graphs_usable(net(bits=None)[1], CUDA, 1000)  # the float network: no estimator at all
    monkeypatch.setenv("BITBENCH_CUDA_GRAPHS", "0")
    assert not graphs_usable(model, CUDA, 1000) and graphs_usable(model, CUDA, 1000, enabled=True)


def test_without_graphs_the_context_gives_the_model_itself():
    _, model = net()
    forward = model.forward
    with graphed_forward(model, (8, 3, 32, 32), 1000, torch.device("cpu")) as fwd:
        assert fwd is model
    assert model.forward == forward and "forward" not in vars(model)


def test_the_warm_up_leaves_no_trace_and_short_batches_run_eagerly(monkeypatch):
    """The context's own logic, with torch's capture replaced by a stand-in that warms up as torch does (three
    training passes, which move BatchNorm's and the estimators' running statistics) and then routes the model's
    forward through a recorder."""
    import workers.cuda_graphs as cg

    replayed = []

    def capture(model, sample_args):
        eager = model.forward
        for _ in range(3):
            model(*sample_args).sum().backward()

        def graph(x):
            replayed.append(tuple(x.shape))
            return eager(x)

        model.forward = graph
        return model

    monkeypatch.setattr(cg, "graphs_usable", lambda model, device, full_batches, enabled: True)
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    _, model = net("aqe", 2)
    model.train()(torch.randn(8, 3, 32, 32))  # running statistics set, so the warm-up would move them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with graphed_forward(model, (8, 3, 32, 32), 100, torch.device("cpu")) as forward:
        after = model.state_dict()
        assert [k for k in before if not torch.equal(before[k], after[k])] == []
        forward(torch.randn(8, 3, 32, 32)), forward(torch.randn(5, 3, 32, 32))
    assert replayed == [(8, 3, 32, 32)]  # the short batch ran eagerly
    assert "forward" not in vars(model)


# -- on a GPU -------------------------------------------------------------------------------------------
def train(model, spec, x, y, epochs, graphs):
    """``epochs`` epochs of batches of 64 (the last one short), AQE's α moving between epochs."""
    opt = build_optimizer(model.parameters(), spec.optimizer)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    loader = DeviceLoader(x, y, 64, shuffle=True, generator=gen, crop_padding=4, flip=True)
    results = []
    for epoch in range(1, epochs + 1):
        E.set_progress(model, epoch, epochs)
        context = graphed_forward(model, (64, 3, 32, 32), len(x) // 64, CUDA, True) if graphs else nullcontext(model)
        with context as fwd:
            assert (fwd is model) != graphs
            results.append(train_epoch(model, opt, loader, fwd))
    return results


@needs_cuda
def test_graphed_epochs_train_exactly_as_eager_ones():
    for estimator, bits in [("aqe", 1), ("aqe", 2), ("ste", 3), ("reste", 2), ("xnor", 1), ("hwgq", 2)]:
        check_graphed_equals_eager(estimator, bits)


def check_graphed_equals_eager(estimator, bits):
    spec, eager_model = net(estimator, bits)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * MIN_BATCHES + 10, 3, 32, 32, generator=g).to(CUDA)
    y = torch.randint(0, 10, (len(x),), generator=g).to(CUDA)
    graphed_model = net(estimator, bits)[1]
    graphed_model.load_state_dict(eager_model.state_dict())
    with deterministic(True):
        eager = train(eager_model.to(CUDA), spec, x, y, 2, graphs=False)
        graphed = train(graphed_model.to(CUDA), spec, x, y, 2, graphs=True)
    assert eager == graphed, (estimator, bits, eager, graphed)  # (loss, accuracy, images) of each epoch
    want, got = eager_model.state_dict(), graphed_model.state_dict()
    assert want.keys() == got.keys()
    differ = {k: (want[k].double() - got[k].double()).abs().max().item()  # weights, BatchNorm, running statistics
              for k in want if not torch.equal(want[k], got[k])}
    assert differ == {}, (estimator, bits)
    assert "forward" not in vars(graphed_model)


@needs_cuda
def test_captured_estimators_make_no_host_sync_on_cuda():
    for name in sorted(CAPTURED):
        check_no_host_sync(name)


def check_no_host_sync(name):
    for bits in (1, 2, 3):
        for role in ("weight", "activation"):
            has_stats = "act_stats" in E.get_estimator_class(name).params
            params = {"act_stats": "running"} if role == "activation" and has_stats else {}
            est = E.create_estimator(name, bits=bits, role=role, **params).to(CUDA).train()
            est.set_progress(1, 3)
            x = torch.randn(16, 8, 4, 4, device=CUDA, requires_grad=True)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(2):  # the running statistic's first batch and a later one
                    est(x).sum().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_a_gpu_trial_captures_a_graph_per_epoch_and_frees_it(caplog, monkeypatch):
    """Each capture's leftovers are freed: on an H200, before :func:`workers.cuda_graphs.release_graph`, each
    epoch's capture left 64 MiB allocated (the cuBLAS workspaces of its warm-up stream)."""
    monkeypatch.setenv("BITBENCH_CUDA_GRAPHS", "1")
    spec = parse_spec({"name": "g", "dataset": "synthetic", "model": "convnet_d", "estimators": ["aqe"],
                       "bits": [{"w": 2, "a": 2}], "include_full_precision": False, "epochs": 2, "batch_size": 64,
                       "resources": {"gpu": 0.25},
                       "dataset_options": {"shape": [3, 32, 32], "n_train": 64 * MIN_BATCHES, "n_val": 64,
                                           "n_test": 64}})
    trial = spec.trials()[0]
    run_trial(spec, trial, on_epoch=lambda m, s: None)  # warm-up: cuBLAS workspaces and the like stay
    allocated = torch.cuda.memory_allocated()
    epochs, states = [], []
    with caplog.at_level(logging.DEBUG, logger="workers.cuda_graphs"):
        final = run_trial(spec, trial, on_epoch=lambda m, s: (epochs.append(m), states.append(s)))
    assert caplog.text.count("CUDA graph captured for batches of (64, 3, 32, 32)") == 2
    assert [m["device"].split(":")[0] for m in epochs] == ["cuda", "cuda"] and final["final_test_acc"] is not None
    assert all(0 <= m["train_acc"] <= 1 and m["train_loss"] == m["train_loss"] for m in epochs)  # no NaN
    assert torch.cuda.memory_allocated() == allocated
    tensors = [t for st in states for part in ("model", "optimizer") for t in torch.utils._pytree.tree_leaves(st[part])
               if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)  # checkpoints hold no GPU memory

"""A training epoch's forward and backward on CUDA as one captured graph, replayed per batch.

On a GPU a quantized network's step is hundreds of small kernels, each launched from Python: at 2 and 3 bits
the GPU waits for the CPU about 40 % of a step (BENCHMARKS.md, "GPU"). :func:`graphed_forward` captures the
network's forward and backward once per epoch (``torch.cuda.make_graphed_callables``: a few warm-up passes,
then one capture) and each full batch replays them as one graph. What the graph computes is what the eager
step computes, kernel for kernel; the loss, the optimizer step and the weight clip stay eager (a few foreach
kernels). Once per epoch because values that the estimators read from Python, such as AQE's α, are baked
into the kernels' arguments when captured.

Used when ``BITBENCH_CUDA_GRAPHS=1``, the device is CUDA, every quantizer's estimator says it can be captured
(``Estimator.cuda_graphs``: no host sync, no branch on a tensor's value) and the epoch has at least
:data:`MIN_BATCHES` full batches. Otherwise the context yields the model itself. Off by default for now: on an
H200 it trained bit for bit as the eager steps and 1.3-1.6x faster at 2 and 3 bits, but each capture left
64 MiB of GPU memory behind (cuBLAS workspaces of its warm-up stream); :func:`release_graph` frees them, and
that has not yet run on a GPU (BENCHMARKS.md, "GPU").
"""
from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

import estimators

log = logging.getLogger(__name__)

#: fewer full batches than this in an epoch: eager (a capture costs about four steps)
MIN_BATCHES = 16


def graphs_usable(model: nn.Module, device: torch.device, full_batches: int, enabled: bool | None = None) -> bool:
    """Whether :func:`graphed_forward` would capture ``model`` (see the module's docstring); ``enabled`` None
    reads ``BITBENCH_CUDA_GRAPHS``."""
    if enabled is None:
        enabled = os.environ.get("BITBENCH_CUDA_GRAPHS", "0") == "1"
    return (enabled and device.type == "cuda" and full_batches >= MIN_BATCHES
            and estimators.cuda_graphs_capturable(model))


@contextmanager
def graphed_forward(model: nn.Module, batch_shape: tuple[int, ...], full_batches: int, device: torch.device,
                    enabled: bool | None = None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Inside: a function ``forward(x)`` for the training step, with the model in training mode. A batch of
    ``batch_shape`` replays the captured graph (its backward too, when the loss's is taken); another shape,
    such as an epoch's short last batch, runs eagerly. The warm-up passes leave no trace: every buffer
    (BatchNorm's running statistics, the estimators' running statistics) is put back as it was. On exit the
    model's own forward is back and the graph's memory is freed. Yields ``model`` when graphs are not usable
    (:func:`graphs_usable`, ``enabled`` passed on)."""
    if not graphs_usable(model, device, full_batches, enabled):
        yield model
        return
    eager = model.forward
    saved = [b.detach().clone() for b in model.buffers()]
    model.train()
    sample = torch.zeros(batch_shape, device=device)
    torch.cuda.make_graphed_callables(model, (sample,))  # sets model.forward: the graph in training mode
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved, strict=True):
            b.copy_(s)
    del saved
    log.debug("CUDA graph captured for batches of %s", tuple(batch_shape))
    try:
        yield lambda x: model(x) if x.shape == sample.shape else eager(x)
    finally:
        del model.forward  # the class's forward again
        release_graph(device)


def release_graph(device: torch.device) -> None:
    """Free what a capture leaves behind once its graph is dropped. The graph lives in a reference cycle (torch
    builds an autograd Function class per capture), so its memory pool waits for the cyclic collector: collect
    now. Each capture also warms up on a new CUDA stream, and cuBLAS keeps a workspace per stream for the
    process's life: on an H200 each epoch's capture left 64 MiB allocated (tests/test_cuda_graphs.py). Clearing
    the workspaces, as torch's own Inductor does around its CUDA graphs, drops them; the next matmul allocates
    its stream's again. Safe only with no graph left to replay: the process's trial holds at most this one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch._C._cuda_clearCublasWorkspaces()

"""Where and with what a trial was trained: versions, machine and Ray placement, read in the worker.

:func:`provenance` returns one JSON-ready dict per trial attempt (docs/CONTRACTS.md)::

    {"bitbench": "0.1.0", "git_commit": "25bdfac…" | None, "python": "3.11.9", "torch": "2.14.1+cu130",
     "ray": "2.60.0" | None, "cuda": "13.0" | None, "cpu": "AMD EPYC 9454 48-Core Processor", "gpu": "NVIDIA H200" | None,
     "host": "node-3", "ray_node_id": "ab12…" | None, "ray_node_ip": "10.0.0.3" | None, "ray_gpu_ids": [0] | None,
     "cuda_visible_devices": "0" | None, "device": "cuda:0"}

The process's part (versions, commit, CPU, host) is read once per process and cached; the Ray part
and the device's GPU name are asked each time (cheap: no subprocess, no import of Ray when it is not
loaded already). ``git_commit`` is read from the checkout's ``.git`` files (a worktree's ``.git``
file, loose refs, ``packed-refs``) without running git; None when the code is not a checkout.
"""
from __future__ import annotations

import os
import platform
import socket
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

#: the source tree this code was loaded from (its ``.git``, when it is a checkout)
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = SOURCE_ROOT) -> str | None:
    """The commit checked out at ``root`` (40 hex digits), read from ``root/.git``; None without one."""
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            line = git.read_text().strip()
            if not line.startswith("gitdir:"):
                return None
            git = (root / line.split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return _sha(head)
    ref = head.split(":", 1)[1].strip()
    common = git
    if (git / "commondir").is_file():  # a worktree keeps its branches in the main repository
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for d in dict.fromkeys((git, common)):
        try:
            return _sha((d / ref).read_text().strip())
        except OSError:
            pass
    try:
        packed = (common / "packed-refs").read_text().splitlines()
    except OSError:
        return None
    for line in packed:
        sha, _, name = line.partition(" ")
        if name.strip() == ref:
            return _sha(sha)
    return None


def _sha(text: str) -> str | None:
    text = text.strip().lower()
    return text if len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text) else None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cache
def process_provenance() -> dict:
    """What stays the same for the life of this process (read once)."""
    ray = sys.modules.get("ray")
    return {
        "bitbench": _version("bitbench"), "git_commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": getattr(ray, "__version__", None) or _version("ray"),
        "cuda": torch.version.cuda, "cpu": cpu_model(), "host": socket.gethostname(),
    }


def ray_placement() -> dict:
    """This worker's Ray node id and IP and the GPU ids Ray assigned it; all None outside a Ray worker."""
    ray = sys.modules.get("ray")  # a process that never imported Ray is not in a Ray worker
    if ray is None or not ray.is_initialized():
        return {"ray_node_id": None, "ray_node_ip": None, "ray_gpu_ids": None}
    return {"ray_node_id": ray.get_runtime_context().get_node_id(), "ray_node_ip": ray.util.get_node_ip_address(),
            "ray_gpu_ids": [int(i) if str(i).isdigit() else str(i) for i in ray.get_gpu_ids()]}


@cache
def _gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def provenance(device: torch.device | str) -> dict:
    """The provenance record of a trial training on ``device`` in this process (module doc)."""
    dev = torch.device(device)
    gpu = _gpu_name(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else None
    return {**process_provenance(), "gpu": gpu, **ray_placement(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": str(dev)}

"""scripts/gpu-node.sh (the image's bitbench-gpu-node): CUDA MPS before `ray start`, or a reason why not.

Run with fake ``nvidia-smi``, ``nvidia-cuda-mps-control`` and ``ray`` first on the PATH, each of which
writes down its arguments and the MPS pipe directory it was given."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-node.sh"
FAKE = """#!/bin/sh
echo "$0 $* pipe=${CUDA_MPS_PIPE_DIRECTORY:-unset}" >> "$CALLS"
exit ${EXIT:-0}
"""


def fake(bin_dir: Path, name: str, exit_code: int = 0) -> None:
    path = bin_dir / name
    path.write_text(FAKE.replace("${EXIT:-0}", str(exit_code)))
    path.chmod(0o755)


def node(tmp_path: Path, *, gpu=True, control: int | None = 0, **env) -> tuple[list[str], str]:
    """Run the script with fakes (``control`` None: no MPS binary); return (the fakes' calls, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake(bin_dir, "ray")
    fake(bin_dir, "nvidia-smi", 0 if gpu else 9)
    if control is not None:
        fake(bin_dir, "nvidia-cuda-mps-control", control)
    calls = tmp_path / "calls"
    environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls),
               "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"), **env}
    proc = subprocess.run(["sh", str(SCRIPT), "--address=head:6379", "--block"], env=environ, capture_output=True,
                          text=True, timeout=30, check=True)
    lines = [line.replace(str(bin_dir) + "/", "") for line in calls.read_text().splitlines()]
    return [line for line in lines if not line.startswith("nvidia-smi")], proc.stderr


def test_mps_starts_before_ray_and_ray_workers_get_its_pipe(tmp_path):
    pipe = tmp_path / "pipe"
    calls, err = node(tmp_path, CUDA_MPS_PIPE_DIRECTORY=str(pipe))
    assert calls == [f"nvidia-cuda-mps-control -d pipe={pipe}", f"ray start --address=head:6379 --block pipe={pipe}"]
    assert pipe.is_dir() and (tmp_path / "log").is_dir()
    assert "CUDA MPS on" in err and "side by side" in err


@pytest.mark.parametrize("case, kwargs, reason", [
    ("turned off", {"BITBENCH_CUDA_MPS": "0"}, "off (BITBENCH_CUDA_MPS=0)"),
    ("no GPU", {"gpu": False}, "off (nvidia-smi lists no GPU)"),
    ("no MPS binary", {"control": None}, "no nvidia-cuda-mps-control: is the compute driver capability given?"),
])
def test_without_mps_ray_starts_alone_and_the_log_says_why(tmp_path, case, kwargs, reason):
    env = {k: v for k, v in kwargs.items() if k.isupper()}
    calls, err = node(tmp_path, **{k: v for k, v in kwargs.items() if not k.isupper()}, **env)
    assert calls == ["ray start --address=head:6379 --block pipe=unset"]
    assert reason in err, case


def test_a_daemon_that_fails_to_start_leaves_ray_without_the_pipe(tmp_path):
    calls, err = node(tmp_path, control=1, CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "pipe"))
    assert calls[0].startswith("nvidia-cuda-mps-control -d")
    assert calls[1] == "ray start --address=head:6379 --block pipe=unset"
    assert "did not start" in err and str(tmp_path / "log" / "control.log") in err

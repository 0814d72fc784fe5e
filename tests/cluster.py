"""A Ray cluster of separate nodes on this machine, and the service joined to it, for tests/test_cluster.py.

:class:`LocalCluster` drives ``scripts/local-cluster.sh`` (the script a user rehearses the
cluster with): a head that schedules nothing and two worker nodes of one CPU each, every node a
``ray start --block`` with its own temp dir and process group, token authentication on, Tune
storage shared by path, and ports picked free for this session. :meth:`LocalCluster.attempts`
reads from that storage (Tune's ``result.json`` of each trial) which node ran each attempt of a
trial and from which epoch it started.

:class:`ClusterStack` is the API and the dispatcher as real processes over one SQLite file; the
dispatcher joins by ``RAY_ADDRESS`` with the cluster's token, as docker-compose.yml starts it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.test_e2e import Proc, RunsClient, free_port, wait_until
from workers.tune_callback import reported_epochs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local-cluster.sh"
WORKERS = ("ray-worker-1", "ray-worker-2")
NODES = ("ray-head", *WORKERS)
SCRIPT_TIMEOUT_S = 420  # `up` waits up to 120 s for the head and 180 s for the workers
RUN_TIMEOUT_S = 600
# Ray, token and CUDA settings of the calling shell would leak into the nodes or the dispatcher
_FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR",
            "RAY_OVERRIDE_RESOURCES", "CUDA_VISIBLE_DEVICES", "BITBENCH_CLUSTER_PORT", "BITBENCH_FAULT_DIR")


@dataclass(frozen=True)
class Attempt:
    """One attempt of a trial as Tune recorded it: the node it ran on and the epochs it reported."""

    node: str  # "ray-worker-1", … (or the Ray node id, for a node this fixture did not start)
    epochs: list[int]
    reports: list[list[int]]  # the epochs of each report (several in one when short: workers.sweep.EpochBatcher)


def clean_environ(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(extra)
    return env


class LocalCluster:
    """``scripts/local-cluster.sh`` in ``root``: 2 worker nodes of 1 CPU, ``gpus`` declared per worker node."""

    def __init__(self, root: Path, *, gpus: str = "1 0"):
        self.root = root
        self.dir = root / "c"  # Ray's socket paths live below it: keep it short
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.node_ids: dict[str, str] = {}  # node name -> Ray node id, as of the latest up()
        self._names: dict[str, str] = {}  # Ray node id -> node name, of every up() so far
        self.env = clean_environ(
            BITBENCH_CLUSTER_DIR=str(self.dir), BITBENCH_CLUSTER_WORKERS=str(len(WORKERS)),
            BITBENCH_CLUSTER_CPUS="1", BITBENCH_CLUSTER_GPUS=gpus, BITBENCH_CLUSTER_GRACE_S="5",
            HOME=str(root / "home"), PYTHONUNBUFFERED="1")

    # -- the script ---------------------------------------------------------------------------
    def script(self, *args: str) -> str:
        result = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                                timeout=SCRIPT_TIMEOUT_S)
        if result.returncode != 0:
            raise AssertionError(f"local-cluster.sh {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}{result.stderr}\n{self.log_tails()}")
        return result.stdout

    def up(self) -> str:
        """Start the nodes not running (all when the head is not); ``node_ids`` then names them."""
        out = self.script("up")
        self.node_ids = {node: self.node_id(node) for node in NODES}
        self._names.update({ray_id: node for node, ray_id in self.node_ids.items()})
        return out

    def down(self) -> None:
        """Stop every node; SIGKILL what a failed script left (teardown must not leak a cluster)."""
        try:
            self.script("down")
        finally:
            for node in NODES:
                pid = self.leader(node)
                if pid is not None:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def kill(self, node: str) -> None:
        """SIGKILL the node's process group (its raylet, agents and Ray workers): a host lost."""
        pids = self.processes(node)
        assert any(self.command(p).startswith("ray::") for p in pids), f"{node} runs no Ray worker: {pids}"
        self.script("kill", node)
        wait_until(lambda: not self.processes(node), 30, f"every process of {node} to be gone")

    def stop(self, node: str) -> None:
        """SIGTERM the node's process group, SIGKILL after 5 s: ``docker compose stop`` with a short grace."""
        self.script("stop", node)
        assert not self.processes(node)

    # -- what it made -------------------------------------------------------------------------
    @property
    def join_env(self) -> dict[str, str]:
        """``cluster.env``: RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN, BITBENCH_TUNE_DIR."""
        lines = (self.dir / "cluster.env").read_text().splitlines()
        return dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))

    @property
    def address(self) -> str:
        return self.join_env["RAY_ADDRESS"]

    def node_id(self, node: str) -> str:
        """Ray's id of the node as it runs now: its raylet's ``--node_id``."""
        flags = [arg for pid in self.processes(node) for arg in self.command(pid).split()
                 if arg.startswith("--node_id=")]
        assert len(flags) == 1, f"{node}: raylet flags {flags}"
        return flags[0].split("=", 1)[1]

    def leader(self, node: str) -> int | None:
        try:
            return int((self.dir / "nodes" / f"{node}.pid").read_text())
        except (OSError, ValueError):
            return None

    def processes(self, node: str) -> list[int]:
        """Live processes in the node's process group (Linux /proc)."""
        pgid = self.leader(node)
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(d.name))
        return found

    @staticmethod
    def command(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    def attempts(self, experiment: str) -> dict[str, list[Attempt]]:
        """``{trial key: its attempts in order}`` from Tune's ``result.json`` of each trial on the shared
        storage: an attempt begins at a result with ``iterations_since_restore == 1``, whose provenance
        (the attempt's first report carries it) names the Ray node."""
        out = {}
        for path in (Path(self.join_env["BITBENCH_TUNE_DIR"]) / experiment).glob("*/result.json"):
            results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            attempts: list[Attempt] = []
            for r in results:
                if r.get("iterations_since_restore") == 1:
                    ray_id = json.loads(r["provenance"])["ray_node_id"]
                    attempts.append(Attempt(self._names.get(ray_id, ray_id), [], []))
                if r.get("epoch") is not None:
                    attempts[-1].reports.append([int(m["epoch"]) for m in reported_epochs(r)])
                    attempts[-1].epochs.extend(attempts[-1].reports[-1])
            out[results[0]["config"]["trial"]["key"]] = attempts
        return out

    def log_tails(self, n: int = 1500) -> str:
        logs = sorted((self.dir / "logs").glob("*.log")) if (self.dir / "logs").is_dir() else []
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-n:]}" for f in logs)


class ClusterStack(RunsClient):
    """The API and a dispatcher (real processes, one SQLite file) joined to ``cluster``."""

    def __init__(self, tmp: Path, cluster: LocalCluster):
        self.tmp, self.cluster = tmp, cluster
        (tmp / "home").mkdir(exist_ok=True)
        self.port = free_port()
        self.env = clean_environ(
            HOME=str(tmp / "home"), DATABASE_URL=f"sqlite:///{tmp / 'cluster.sqlite'}",
            BITBENCH_DATA_DIR=str(tmp / "data"), BITBENCH_API_TOKEN="", BITBENCH_HEARTBEAT_S="1",
            BITBENCH_STALE_S="300", PYTHONUNBUFFERED="1",  # requeues here come from the dispatcher, not staleness
            BITBENCH_REPORT_EVERY_S="0")  # epoch by epoch: the windows to break the cluster in count stored epochs
        self.api = Proc("api", ["-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(self.port),
                                "--log-level", "warning"], self.env, tmp)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        wait_until(self._healthy, 120, "the API", procs=[self.api])
        self.dispatcher: Proc | None = None

    def _healthy(self) -> bool:
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def start_dispatcher(self, **overrides: str) -> Proc:
        """``python -m service.dispatcher`` with the cluster's cluster.env (as compose's dispatcher service)."""
        env = {**self.env, **self.cluster.join_env, **overrides}
        return Proc("dispatcher", ["-m", "service.dispatcher", "--poll-seconds", "0.5"], env, self.tmp)

    def ensure_dispatcher(self) -> Proc:
        if self.dispatcher is None or not self.dispatcher.alive():
            self.dispatcher = self.start_dispatcher()
        return self.dispatcher


    def trials(self, run_id: int) -> dict[str, dict]:
        return {t["key"]: t for t in self.client.get(f"/runs/{run_id}/trials").json()}

    def epochs(self, run_id: int) -> set[tuple[str, int]]:
        """(trial key, epoch) of every stored metrics row, from the CSV export."""
        rows = csv.DictReader(io.StringIO(self.client.get(f"/runs/{run_id}/export").text))
        return {(r["trial_key"], int(r["epoch"])) for r in rows}

    def wait_finished(self, run_id: int, timeout: float = RUN_TIMEOUT_S) -> dict:
        def finished():
            run = self.run(run_id)
            return run if run["status"] in ("done", "failed", "cancelled") else None

        return wait_until(finished, timeout, f"run {run_id} to finish", every=1, procs=[self.api, self.dispatcher])

    def close(self) -> None:
        self.client.close()
        if self.dispatcher is not None:
            self.dispatcher.stop(timeout=20)
        self.api.stop()

"""docker-compose.yml, Dockerfile and .env.example, checked without a Docker engine.

``docker-compose config`` (Debian's package; ``scripts/system-deps.sh`` installs it) validates the file
against the Compose schema and resolves the variables; it is skipped when the command is
missing, except under CI=true, where that fails. The structural checks read the YAML itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SERVICES = {"db", "migrate", "api", "dispatcher", "ray-head", "ray-worker"}
RAY_NODES = ("ray-head", "ray-worker")
# GCS, Redis shard, object/node manager, dashboard + job API, client server, dashboard agent, metrics
RAY_PORTS = {6379, 6380, 8076, 8077, 8265, 10001, 44217, 44227, 52365, *range(10002, 20000)}
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "BITBENCH_API_TOKEN": "api-secret", "RAY_AUTH_TOKEN": "ray-secret"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def words(value) -> str:
    """A command or health-check test (list or string) as one string."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def environment(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def published(service: dict) -> list[tuple[int | None, int]]:
    """(host port or its ${VAR:-default}, container port) of each ``ports`` entry."""
    out = []
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("published"), int(p["target"])))
            continue
        host, _, target = str(p).rpartition(":")
        default = re.search(r"(\d+)\D*$", host)
        out.append((int(default.group(1)) if default else None, int(target.split("/")[0])))
    return out


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def run_config(tmp_path: Path, env_lines: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = compose_command()
    if cmd is None:
        message = "docker-compose is not installed (run scripts/system-deps.sh as root)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env_lines.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith(("POSTGRES_", "BITBENCH_"))}
    return subprocess.run([*cmd, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
                          capture_output=True, text=True, env=clean, cwd=tmp_path, timeout=120)


# -- docker-compose config ----------------------------------------------------------------------
def test_docker_compose_config_accepts_the_file(tmp_path):
    result = run_config(tmp_path, {**SECRETS, "BITBENCH_PORT": "127.0.0.1:8123"})
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    assert set(resolved) == SERVICES
    assert resolved["api"]["environment"]["BITBENCH_API_TOKEN"] == "api-secret"
    assert resolved["api"]["environment"]["DATABASE_URL"] == "postgresql://bitbench:pg-secret@db:5432/bitbench"
    [port] = resolved["api"]["ports"]
    assert resolved_port(port) == ("127.0.0.1", 8123, 8000)


def resolved_port(port) -> tuple[str | None, int, int]:
    """(host address, host port, container port) of a resolved ``ports`` entry: compose v1 prints
    ``127.0.0.1:8123:8000/tcp``, v2 a mapping."""
    if isinstance(port, dict):
        return port.get("host_ip"), int(port["published"]), int(port["target"])
    *host, published_port, target = str(port).split("/")[0].split(":")
    return (host[0] if host else None), int(published_port), int(target)


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_docker_compose_config_refuses_a_missing_secret(tmp_path, missing):
    result = run_config(tmp_path, {k: v for k, v in SECRETS.items() if k != missing})
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


# -- the file's structure -----------------------------------------------------------------------
def test_services_and_volumes(compose, services):
    assert "version" not in compose  # the Compose specification has none
    assert set(services) == SERVICES
    assert {"pgdata", "tune", "datasets"} <= set(compose["volumes"])


def test_database_and_its_health_check(services):
    db = services["db"]
    assert db["image"].startswith("postgres:16")
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"]
    check = words(db["healthcheck"]["test"])
    assert "pg_isready" in check and "-h 127.0.0.1" in check and "-U" in check


def test_migrate_is_one_shot_and_gates_the_api_and_dispatcher(services):
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert "migrate(" in words(migrate["command"])
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("api", "dispatcher"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_api_needs_the_token_and_has_a_health_check(services):
    api = services["api"]
    assert re.fullmatch(r"\$\{BITBENCH_API_TOKEN:\?[^}]+\}", environment(api)["BITBENCH_API_TOKEN"])
    assert "/healthz" in words(api["healthcheck"]["test"])
    assert "service.app:app" in words(api["command"])


def test_only_the_api_publishes_a_port_and_never_a_ray_port(services):
    exposed = {name: published(s) for name, s in services.items() if s.get("ports")}
    assert set(exposed) == {"api"}
    assert exposed["api"] == [(8000, 8000)]
    for name, service in services.items():
        assert service.get("network_mode") != "host", name  # would publish every Ray port
        for host, target in published(service):
            assert host not in RAY_PORTS and target not in RAY_PORTS, name


def test_ray_head_schedules_only_and_serves_no_dashboard(services):
    command = words(services["ray-head"]["command"])
    assert "--head" in command and "--num-cpus=0" in command and "--num-gpus=0" in command
    assert "--include-dashboard=false" in command or "--dashboard-host=127.0.0.1" in command


def test_ray_worker_gpus_shm_and_scaling(services):
    worker = services["ray-worker"]
    assert "--address=ray-head:6379" in words(worker["command"])
    # CUDA MPS first (scripts/gpu-node.sh, installed in the image under this name), with the driver capability
    # that brings its binaries, and on unless the operator turns it off
    assert words(worker["command"]).startswith("bitbench-gpu-node ")
    assert "COPY scripts/gpu-node.sh /usr/local/bin/bitbench-gpu-node" in (ROOT / "Dockerfile").read_text()
    env = environment(worker)
    assert "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    assert env["BITBENCH_CUDA_MPS"] == "${BITBENCH_CUDA_MPS:-1}"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert worker["shm_size"]
    assert "container_name" not in worker  # --scale ray-worker=N needs distinct names


def test_dispatcher_joins_ray_and_shares_tune_storage_with_the_workers(services):
    dispatcher = services["dispatcher"]
    assert environment(dispatcher)["RAY_ADDRESS"] == "ray-head:6379"
    assert "python -m service.dispatcher" in words(dispatcher["command"])
    mounts = {s: dict(v.split(":")[:2] for v in services[s]["volumes"]) for s in ("dispatcher", "ray-worker")}
    assert mounts["dispatcher"]["tune"] == mounts["ray-worker"]["tune"]
    assert environment(dispatcher)["BITBENCH_TUNE_DIR"] == mounts["dispatcher"]["tune"]
    assert "datasets" in mounts["ray-worker"]
    # compiled kernels outlive the container: Inductor's cache on the workers' datasets volume
    cache = environment(services["ray-worker"])["TORCHINDUCTOR_CACHE_DIR"]
    assert cache.startswith(mounts["ray-worker"]["datasets"] + "/"), cache


def test_ray_nodes_get_no_database_credentials(services):
    for name in RAY_NODES:
        env = environment(services[name])
        assert not {"DATABASE_URL", "POSTGRES_PASSWORD"} & set(env), name
        assert "backend" not in services[name].get("networks", []), name
        assert env.get("RAY_AUTH_MODE") == "token" and env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")


def test_env_example_lists_every_variable_the_file_uses():
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    assert used <= set(example), used - set(example)
    assert not any(example[k] for k in SECRETS), "secrets in .env.example must be left empty"


# -- Dockerfile ---------------------------------------------------------------------------------
def test_dockerfile_pins_agree_with_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(d.split("==") for d in deps if d.split("==")[0] in ("torch", "torchvision"))
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pins['torch'])}$", dockerfile, re.M)
    assert re.search(rf"^ARG TORCHVISION_VERSION={re.escape(pins['torchvision'])}$", dockerfile, re.M)


def test_dockerfile_runs_unprivileged_from_python_311_slim():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert next(line for line in lines if line.startswith("FROM")).startswith("FROM python:3.11-slim")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert not any(line.startswith("HEALTHCHECK") for line in lines)  # compose does the checks
    assert any("BITBENCH_DATA_DIR=/data" in line for line in lines)
    # dependencies before the source: the package is installed after its requirements
    install_deps = next(i for i, line in enumerate(lines) if "pip install -r" in line)
    copy_source = next(i for i, line in enumerate(lines) if line.startswith("COPY service"))
    assert install_deps < copy_source


def test_the_local_cluster_rehearses_the_ray_layout():
    """scripts/local-cluster.sh (tests/test_cluster.py) starts the nodes as the Ray services here do, and
    the services that fall out of a lost cluster (the dispatcher exits 1, a worker's raylet ends) restart."""
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    script = (ROOT / "scripts" / "local-cluster.sh").read_text()
    head = next(line for line in script.splitlines() if "start_node ray-head" in line)
    for flag in ("--head", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false"):
        assert flag in head and flag in words(compose["ray-head"]["command"]), flag
    assert '"$RAY" start --block' in script and "--block" in words(compose["ray-worker"]["command"])
    assert '--address="$ADDRESS"' in script and "--address=ray-head:6379" in words(compose["ray-worker"]["command"])
    assert "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN" in script
    for name in ("dispatcher", *RAY_NODES):
        assert compose[name]["restart"] == "unless-stopped", name
        assert environment(compose[name]).get("RAY_AUTH_MODE") == "token", name

"""The ``bitbench`` command line client against a real server: uvicorn on a loopback port, in a
thread, over a temporary SQLite database; results are put in through ``service.sink.SqlSink``."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy.orm import sessionmaker
from typer.testing import CliRunner

from service import store
from service.app import create_app
from service.cli import app
from service.config import Settings
from service.sink import SqlSink

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # starts a server
TOKEN = "cli-test-token"
ALG1 = {"name": "aqe", "params": {"backward": "alg1"}}  # label aqe[backward=alg1]: brackets, as in rich markup
SPEC = {"name": "cli-test", "dataset": "digits", "model": "digits_net", "estimators": ["ste", ALG1],
        "bits": {"w": [1, 2], "a": 1}, "seeds": [0, 1], "epochs": 2}  # 2 × 2 × 2 + 2 float = 10 trials
TRIALS = 10


@dataclass
class Server:
    url: str
    sessions: sessionmaker

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def finish(self, run_id: int, run_status: str | None = "done", error: str | None = None) -> None:
        """Report every trial of the run through the SQL sink (2 epochs each), then end the run."""
        with self.sessions() as s:
            keys = [t["key"] for t in store.list_trials(s, run_id)]
        sink = SqlSink(self.sessions, run_id)
        for i, key in enumerate(keys):
            acc = 0.5 + 0.01 * i
            sink.on_trial_start(key, {"device": "cpu", "attempt": 1})
            for epoch in (1, 2):
                sink.on_epoch(key, {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc, "val_acc": acc,
                                    "test_acc": acc, "lr": 0.01, "epoch_seconds": 0.1, "images_per_s": 100.0,
                                    "device": "cpu", "schedule": {}})
            sink.on_trial_end(key, "done", {"final_test_acc": acc, "final_val_acc": acc, "best_val_acc": acc,
                                            "best_epoch": 2, "epochs": 2}, None)
        if run_status is not None:
            with self.sessions() as s:
                assert store.finish_run(s, run_id, run_status, error)


def _loopback_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service with a token, serving on a free loopback port until the module ends."""
    db = tmp_path_factory.mktemp("cli") / "bitbench.sqlite"
    api = create_app(Settings(database_url=f"sqlite:///{db}", api_token=TOKEN))
    sock = _loopback_socket()
    uv = uvicorn.Server(uvicorn.Config(api, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{sock.getsockname()[1]}", api.state.session_factory)
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def bitbench(server, monkeypatch):
    """``bitbench(*args, token=TOKEN)`` → click Result; server and token from the environment."""
    runner = CliRunner()
    for var in ("BITBENCH_SERVER", "BITBENCH_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)

    def run(*args: str, token: str | None = TOKEN, server_url: str | None = None):
        env = {"BITBENCH_SERVER": server_url or server.url, "BITBENCH_API_TOKEN": token}
        return runner.invoke(app, [str(a) for a in args], env=env)

    return run


@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


@pytest.fixture
def run_id(bitbench, spec_file) -> int:
    result = bitbench("submit", spec_file)
    assert result.exit_code == 0, result.output
    return int(result.stdout)


def refused(result, *needles: str) -> str:
    """Exit code 2 and every needle in stderr (stdout empty): the CLI's error contract."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


# -- submit -------------------------------------------------------------------------------------
def test_submit_prints_the_run_id(server, bitbench, spec_file):
    result = bitbench("submit", spec_file)
    assert result.exit_code == 0, result.output
    run_id = int(result.stdout.strip())  # only the id on stdout: RUN=$(bitbench submit spec.json)
    assert f"run {run_id}: {TRIALS} trials, queued" in result.stderr
    run = server.get(f"/runs/{run_id}").json()
    assert run["name"] == "cli-test" and run["status"] == "queued" and run["trial_count"] == TRIALS


def test_submit_dry_run_prints_the_plan_and_queues_nothing(server, bitbench, monkeypatch, tmp_path):
    monkeypatch.setenv("BITBENCH_GPU_FIGURES", str(tmp_path / "absent.json"))  # the server runs in this process
    with server.sessions() as s:
        before = store.count_rows(s)
    result = bitbench("submit", "--dry-run", Path(__file__).parents[1] / "studies" / "cifar10_paper_table1.json")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("155 trials (float 5, aqe 75, clipped_ste 75) × 200 epochs") == 4  # models A–D
    assert "cifar10 / convnet_a" in out and "cifar10 / convnet_d" in out and "nothing queued (dry run)" in out
    assert out.count("estimated single-GPU time: unknown: no GPU figures recorded") == 4
    assert out.count("  cifar-10-batches-py/data_batch_1\n") == 4
    with server.sessions() as s:
        assert store.count_rows(s) == before


def test_submit_with_an_idempotency_key_returns_the_same_run(bitbench, spec_file):
    first = bitbench("submit", spec_file, "--idempotency-key", "cli-k1")
    again = bitbench("submit", spec_file, "--idempotency-key", "cli-k1")
    assert first.exit_code == again.exit_code == 0
    assert first.stdout == again.stdout
    assert "already queued" in again.stderr


def test_options_override_the_environment(server, bitbench, spec_file):
    result = bitbench("--server", server.url, "--token", TOKEN, "submit", spec_file,
                      token="wrong", server_url="http://127.0.0.1:1")
    assert result.exit_code == 0, result.output


def test_an_invalid_spec_lists_each_field(server, bitbench, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SPEC, "epochs": 0, "colour": "red", "estimators": ["aqe", "nope"]}))
    before = server.get("/runs").json()["total"]
    err = refused(bitbench("submit", bad), "refused the request (3 errors)", "  epochs: ",
                  "  colour: Extra inputs", "  estimators[1]: Value error, unknown estimator 'nope'")
    assert len(err.splitlines()) == 4
    assert server.get("/runs").json()["total"] == before


@pytest.mark.parametrize("content, needles", [
    (None, ("cannot read spec", "No such file")),
    ("{not json", ("is not JSON: line 1 column 2",)),
])
def test_a_missing_or_broken_spec_file(bitbench, tmp_path, content, needles):
    path = tmp_path / "spec.json"
    if content is not None:
        path.write_text(content)
    refused(bitbench("submit", path), *needles)


def test_writes_need_the_token(server, bitbench, spec_file):
    before = server.get("/runs").json()["total"]
    refused(bitbench("submit", spec_file, token=None),
            "the server needs a token: set BITBENCH_API_TOKEN or pass --token")
    refused(bitbench("submit", spec_file, token="wrong"), "the token was refused")
    assert server.get("/runs").json()["total"] == before


def test_reads_need_no_token(bitbench, run_id):
    assert bitbench("status", run_id, token=None).exit_code == 0


def test_a_server_that_is_down(bitbench, spec_file):
    with _loopback_socket() as closed:  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        for args in (("submit", spec_file), ("status", "1"), ("leaderboard",)):
            refused(bitbench(*args, server_url=url), f"cannot reach bitbench at {url}: ")


@pytest.mark.parametrize("args", [("status",), ("wait",), ("cancel",), ("export", "--format", "json")])
def test_an_unknown_run(bitbench, args):
    result = bitbench(args[0], "987654", *args[1:])
    assert refused(result, "run 987654 not found").count("\n") == 1  # one line


# -- status, cancel -----------------------------------------------------------------------------
def test_status_shows_queued_and_progress(bitbench, run_id):
    result = bitbench("status", run_id)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"run {run_id}" in out and "cli-test" in out and "digits / digits_net" in out
    rows = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in out.splitlines() if re.search("[│┃]", line)]
    assert rows == [["status", "done", "running", "queued", "failed", "cancelled", "trials"],
                    ["queued", "0", "0", str(TRIALS), "0", "0", str(TRIALS)]]
    assert f"epochs stored: 0 / {TRIALS * SPEC['epochs']}" in out


def test_cancel_a_queued_run(server, bitbench, run_id):
    result = bitbench("cancel", run_id)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"run {run_id}: cancelled"
    assert server.get(f"/runs/{run_id}").json()["status"] == "cancelled"
    refused(bitbench("cancel", run_id, token=None), "needs a token")


# -- wait ---------------------------------------------------------------------------------------
def test_wait_for_a_finished_run(server, bitbench, run_id):
    server.finish(run_id)
    result = bitbench("wait", run_id, "--interval", "0.05")
    assert result.exit_code == 0, result.output
    assert "100%" in result.stdout and f"{TRIALS}/{TRIALS}" in result.stdout and "done" in result.stdout


def test_wait_for_a_failed_run_exits_1(server, bitbench, run_id):
    server.finish(run_id, "failed", "Traceback …\nRuntimeError: out of memory")
    result = bitbench("wait", run_id, "--interval", "0.05")
    assert result.exit_code == 1, result.output
    assert f"run {run_id} failed: RuntimeError: out of memory" in result.stderr


def test_wait_follows_a_run_until_it_ends(server, bitbench, run_id):
    finisher = threading.Timer(0.5, server.finish, args=(run_id,))
    finisher.start()
    try:
        result = bitbench("wait", run_id, "--interval", "0.1")
    finally:
        finisher.join()
    assert result.exit_code == 0, result.output
    assert "100%" in result.stdout


def test_wait_gives_up_after_its_timeout(bitbench, run_id):
    result = bitbench("wait", run_id, "--interval", "0.05", "--timeout", "0.2")
    assert result.exit_code == 2
    assert result.stderr == f"bitbench: run {run_id} is still queued after 0.2 s\n"


# -- leaderboard, export ------------------------------------------------------------------------
def test_leaderboard_without_results(bitbench):
    result = bitbench("leaderboard", "--dataset", "cifar100", "--model", "resnet20")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "no finished trials for cifar100 / resnet20 yet"


def test_leaderboard_table_grouped_by_bits(server, bitbench, run_id):
    server.finish(run_id)
    result = bitbench("leaderboard", "--dataset", "digits", "--model", "digits_net")
    assert result.exit_code == 0, result.output
    out = result.stdout
    rows = server.get("/leaderboard?dataset=digits&model=digits_net").json()
    assert len(rows) == 5  # 2 estimators × 2 bit cells + float
    assert rows[0]["protocol_label"].startswith("digits/digits_net · ") and rows[0]["protocol_label"] in out
    assert f"protocol {rows[0]['protocol']}" in out  # the table's caption: what --protocol takes
    for needle in ("W1A1", "W2A1", "float", "aqe[backward=alg1]", "ste", "95% CI", "grid", "minw"):
        assert needle in out
    assert f"{100 * rows[0]['mean']:.2f}" in out
    only = bitbench("leaderboard", "--protocol", rows[0]["protocol"])
    assert only.exit_code == 0 and rows[0]["protocol_label"] in only.stdout
    other = bitbench("leaderboard", "--protocol", "0" * 16)
    assert other.exit_code == 0 and other.stdout.strip() == f"no finished trials for {'0' * 16} yet"


def test_export_csv_and_json(server, bitbench, run_id, tmp_path):
    server.finish(run_id)
    csv_result = bitbench("export", run_id, "--format", "csv")
    assert csv_result.exit_code == 0, csv_result.output
    lines = csv_result.stdout.splitlines()
    assert "trial_key" in lines[0] and "test_acc" in lines[0]
    assert len(lines) == 1 + TRIALS * 2

    out = tmp_path / "run.json"
    json_result = bitbench("export", run_id, "--format", "json", "--out", out)
    assert json_result.exit_code == 0, json_result.output
    assert json_result.stdout == "" and f"to {out}" in json_result.stderr
    rows = json.loads(out.read_text())
    assert len(rows) == TRIALS * 2 and {r["epoch"] for r in rows} == {1, 2}


def test_export_rejects_an_unknown_format(bitbench):
    result = bitbench("export", "1", "--format", "xml")
    assert result.exit_code == 2 and "xml" in result.output


# -- packaging ----------------------------------------------------------------------------------
def test_the_cli_imports_no_service_internals():
    """An HTTP client only: no torch, Ray, SQLAlchemy or FastAPI when it is imported; of the workers
    only the records' vocabulary (plain Python)."""
    code = ("import sys, service.cli; "
            "print(sorted(m for m in sys.modules if m in ('torch', 'ray', 'sqlalchemy', 'fastapi', 'estimators', "
            "'service.store', 'service.app') or m.startswith('workers.') and m != 'workers.records'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_busy_server_is_asked_again_after_its_retry_after(monkeypatch, capsys):
    """503 + Retry-After (every report render slot taken) is retried after the time it names; a 503
    without it, or one that persists past BUSY_RETRIES, is reported as the refusal it is."""
    import typer

    from service import cli

    answers, waits = [], []
    monkeypatch.setattr(cli.time, "sleep", waits.append)

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    client = cli.Client("http://bitbench.test", None)
    client.http = httpx.Client(base_url="http://bitbench.test", transport=httpx.MockTransport(handler))
    busy = httpx.Response(503, headers={"Retry-After": "2"},
                          json={"detail": [{"loc": [], "msg": "busy", "type": "renders_busy"}]})
    answers[:] = [busy, httpx.Response(503, headers={"Retry-After": "900"}, json={"detail": []}),
                  httpx.Response(200, content=b"zip")]
    assert client.request("GET", "/runs/1/report").content == b"zip"
    assert waits == [2.0, cli.BUSY_WAIT_S] and "trying again in 2 s" in capsys.readouterr().err

    answers[:] = [busy] * (cli.BUSY_RETRIES + 1)
    with pytest.raises(typer.Exit):
        client.request("GET", "/runs/1/report")
    assert not answers and len(waits) == 2 + cli.BUSY_RETRIES

    answers[:] = [httpx.Response(503, json={"detail": [{"loc": [], "msg": "down", "type": "x"}]})]
    with pytest.raises(typer.Exit):
        client.request("GET", "/healthz")
    assert len(waits) == 2 + cli.BUSY_RETRIES  # no Retry-After: not retried

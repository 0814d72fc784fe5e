"""Public reads show a failure's reason, never where things live: trial and run errors keep the
error type and message with relative paths (the traceback goes to the log), and /healthz with the
database down names no host, port or user."""
from __future__ import annotations

import logging
import socket
import sysconfig
import traceback
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError
from sqlalchemy.engine import make_url

from service import store
from service.app import create_app
from service.config import Settings
from service.errors import MAX_CHARS, exception_lines, public_reason
from tests.test_api import make_api, small_spec  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
SITE = sysconfig.get_path("purelib")


def _load_missing(data_dir: Path):
    return torch.load(data_dir / "cifar-10-batches-py" / "data_batch_1.pt")  # raises in torch's own code


def ray_trial_error(data_dir: Path) -> str:
    """What Ray Tune writes for a trial that raised: its ``Failure #`` header, the task's coloured
    name with pid and ip, the traceback through this file and torch, the exception."""
    try:
        _load_missing(data_dir)
    except FileNotFoundError as e:
        err = RayTaskError("ImplicitFunc.train", traceback.format_exc(), e, proctitle="ray::ImplicitFunc.train()",
                           pid=4242, ip="10.0.0.7")
        return f"Failure # 1 (occurred at 2026-01-01_12-00-00)\n{err}"
    raise AssertionError("torch.load found a file that is not there")


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "datasets"
    monkeypatch.setenv("BITBENCH_DATA_DIR", str(d))
    return d


def test_a_failed_trial_shows_its_reason_and_logs_its_traceback(make_api, data_dir, caplog):
    api = make_api()
    run = api.post_run()
    error = ray_trial_error(data_dir)
    assert str(ROOT) in error and SITE in error and str(data_dir) in error  # what must not reach readers

    with caplog.at_level(logging.INFO, logger="service.sink"):
        api.sink(run["id"]).on_trial_start("aqe-w1a1-s0", {"device": "cpu"})
        api.sink(run["id"]).on_trial_end("aqe-w1a1-s0", "failed", None, error)
    [trial] = [t for t in api.get(f"/runs/{run['id']}/trials").json() if t["key"] == "aqe-w1a1-s0"]
    shown = api.get(f"/trials/{trial['id']}").json()["error"]
    assert shown == ("FileNotFoundError: [Errno 2] No such file or directory: "
                     "'<data dir>/cifar-10-batches-py/data_batch_1.pt'")
    assert trial["error"] == shown
    page = api.get(f"/dashboard/trials/{trial['id']}").text
    assert str(data_dir) not in page and str(ROOT) not in page and "&lt;data dir&gt;/cifar-10-batches-py" in page
    logged = [r.getMessage().split(":\n", 1)[1] for r in caplog.records if ":\n" in r.getMessage()]
    assert logged == [error]  # all of it, in the log (beside the sink's one-line event records)


def test_a_failed_run_shows_its_reason(make_api, data_dir):
    api = make_api()
    run = api.post_run()
    with api.sessions() as s:
        assert store.finish_run(s, run["id"], "failed", ray_trial_error(data_dir))
    shown = api.get(f"/runs/{run['id']}").json()["error"]
    assert shown.startswith("FileNotFoundError: ") and "'<data dir>/cifar-10-batches-py/data_batch_1.pt'" in shown
    assert "Traceback" not in shown and 'File "' not in shown and "10.0.0.7" not in shown


def test_exception_lines():
    assert exception_lines("Traceback: boom") == "Traceback: boom"  # no frames: the text itself
    assert exception_lines("Failure # 2 (occurred at 2026-01-01_12-00-00)\nThe actor died unexpectedly") == \
        "The actor died unexpectedly"
    chained = ('Traceback (most recent call last):\n  File "/x/a.py", line 1, in f\n    g()\nKeyError: 1\n\n'
               "The above exception was the direct cause of the following exception:\n\n"
               'Traceback (most recent call last):\n  File "/x/b.py", line 2, in h\n    raise ValueError(\n'
               "        ^^^^^^^^^^^^\nValueError: bad spec:\n  epochs must be positive")
    assert exception_lines(chained) == "ValueError: bad spec:\n  epochs must be positive"


def test_public_reason_makes_paths_relative_and_stays_short(data_dir):
    home = str(Path.home())
    text = (f"OSError: cannot read {data_dir}/MNIST/raw, {data_dir}, {data_dir}-old/x, {home}/notes.txt "
            f"and {ROOT}/workers/train.py")
    assert public_reason(text) == ("OSError: cannot read <data dir>/MNIST/raw, <data dir>, "
                                   f"{data_dir}-old/x, ~/notes.txt and workers/train.py")  # -old: another place
    long = public_reason("RuntimeError: " + "x" * 5000 + " the end")
    assert len(long) == MAX_CHARS and long.endswith("x the end")
    assert public_reason(None) is None


# -- /healthz with the database down ----------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_server(request, tmp_path) -> str:
    return f"postgresql+psycopg://secret_role:pw@127.0.0.1:{_closed_port()}/secret_db"


def _unknown_role(request, tmp_path) -> str:
    server = make_url(request.getfixturevalue("postgres_server"))
    return server.set(username="secret_role", password="pw", database="secret_db").render_as_string(False)


def _a_directory(request, tmp_path) -> str:
    (tmp_path / "secret_db.sqlite").mkdir()  # SQLite cannot open it
    return f"sqlite:///{tmp_path}/secret_db.sqlite"


@pytest.mark.parametrize("down", [pytest.param(_no_server, id="postgresql-no-server"),
                                  pytest.param(_unknown_role, id="postgresql-unknown-role", marks=pytest.mark.postgres),
                                  pytest.param(_a_directory, id="sqlite-a-directory")])
def test_healthz_with_the_database_down_names_no_host_port_or_user(request, tmp_path, down, caplog):
    url = make_url(down(request, tmp_path))
    app = create_app(Settings(database_url=url.render_as_string(hide_password=False)))
    with caplog.at_level(logging.ERROR, logger="service.api.health"):
        r = TestClient(app).get("/healthz")  # no lifespan: it would migrate, and fail, first
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "error" and body["database"].startswith("unreachable (OperationalError")
    secrets = [str(x) for x in (url.host, url.port, url.username, url.password, url.database) if x]
    assert secrets and not [s for s in secrets if s in r.text], r.text
    assert "OperationalError" in caplog.text and any(s in caplog.text for s in secrets)  # the details: logged

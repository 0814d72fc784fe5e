"""Request logging: one line per request with method, path, status and the run / trial ids of its route."""
from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings


def test_each_request_is_logged_with_its_status_and_the_ids_it_names(tmp_path, caplog):
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", home=tmp_path))
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="bitbench.api"):
        assert client.get("/runs/41/trials").status_code == 404
        assert client.get("/trials/9?secret=x").status_code == 404
        assert client.get("/runs").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "bitbench.api"]
    assert len(lines) == 3, lines
    assert lines[0].startswith("GET /runs/41/trials 404 ") and lines[0].endswith("(run 41)")
    assert lines[1].startswith("GET /trials/9 404 ") and lines[1].endswith("(trial 9)")
    assert "secret" not in lines[1]  # query strings are not logged
    assert lines[2].startswith("GET /runs 200 ") and "(" not in lines[2]

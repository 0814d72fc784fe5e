"""workers.storage: Tune storage locations, local paths and object-store URIs alike."""
from __future__ import annotations

import pytest

from service.config import Settings
from workers.storage import ensure_exists, is_uri, join, normalise, resolve_storage


@pytest.mark.parametrize("text, uri", [("s3://bucket/prefix", True), ("gs://b", True), ("file:///tmp/x", True),
                                       ("/tmp/x", False), ("relative/dir", False), ("C:/x", False),
                                       ("~/tune", False), ("weird:name", False)])
def test_is_uri_needs_a_scheme_and_two_slashes(text, uri):
    assert is_uri(text) is uri


def test_normalise_keeps_uris_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalise("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert normalise("file:///srv/tune//") == "file:///srv/tune"
    assert normalise("rel/tune") == str(tmp_path / "rel" / "tune")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert normalise("~/t") == str(tmp_path / "home" / "t")


def test_resolve_storage_reads_the_environment_then_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("BITBENCH_TUNE_DIR", "gs://lab/bitbench/")
    assert resolve_storage() == "gs://lab/bitbench"
    assert resolve_storage(tmp_path) == str(tmp_path)
    monkeypatch.delenv("BITBENCH_TUNE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_storage() == str(tmp_path / ".cache" / "bitbench" / "tune")


def test_join_and_ensure_exists(tmp_path, monkeypatch):
    assert join("s3://b/p", "run-3") == "s3://b/p/run-3"
    assert join(str(tmp_path), "run-3") == str(tmp_path / "run-3")
    ensure_exists(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()
    monkeypatch.chdir(tmp_path)
    ensure_exists("s3://bucket/never-touched")  # a URI is not a relative path "s3:/bucket/…"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_service_settings_take_a_uri_or_a_path(tmp_path, monkeypatch):
    monkeypatch.delenv("BITBENCH_TUNE_DIR", raising=False)  # the Ray fixture sets it for the session once it starts
    assert Settings(tune_dir="s3://bucket/runs/", data_dir=tmp_path).tune_dir == "s3://bucket/runs"
    assert Settings(data_dir=tmp_path).tune_dir == str(tmp_path / "tune")
    assert Settings(tune_dir=tmp_path / "t", data_dir=tmp_path).tune_dir == str(tmp_path / "t")

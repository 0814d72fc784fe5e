"""Database fixtures (a pytest plugin: ``pytest_plugins = ["tests.db_fixtures"]``).

``db_url`` runs a test once on SQLite (a file in tmp_path) and once on PostgreSQL. The
PostgreSQL server is started once per session from the installed Debian binaries
(``/usr/lib/postgresql/<v>/bin``; ``scripts/system-deps.sh`` installs them), as the ``postgres`` user
when the tests run as root (PostgreSQL refuses root), with its data directory and unix socket in
a temporary directory and TCP on a free port of 127.0.0.1; fsync is off. Every test gets a
fresh, empty database (``CREATE DATABASE … TEMPLATE template0``), dropped afterwards.

``BITBENCH_TEST_POSTGRES_URL`` points the tests at an existing server instead (its user must
be allowed to create databases). Without binaries or that URL the postgresql cases are
skipped, unless ``CI=true`` or ``BITBENCH_REQUIRE_POSTGRES=1``: then they fail.

``engine`` is ``db_url`` migrated to head; ``sessions`` a session factory; ``session`` one
session.
"""
from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.db import make_engine, migrate, session_factory


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def postgres_required() -> bool:
    return _truthy("CI") or _truthy("BITBENCH_REQUIRE_POSTGRES")


def find_postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` that has ``pg_ctl``, else ``pg_ctl`` on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    """A throwaway PostgreSQL server from the installed binaries (``start()`` / ``stop()``)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = _free_port()
        self.base = Path(tempfile.mkdtemp(prefix="bitbench-pg-"))
        self.data = self.base / "data"
        self.user = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.base)
        if proc.returncode:
            log = self.base / "server.log"
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{tail}")

    def start(self) -> TempPostgres:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        opts = (f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.base / "server.log"),
                  "-o", opts)
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class PostgresDatabases:
    """Creates and drops databases on one server (``new()`` returns a URL)."""

    _counter = itertools.count(1)

    def __init__(self, url: str):
        self.url = make_url(url)
        self.admin = create_engine(self.url, isolation_level="AUTOCOMMIT")

    def new(self) -> str:
        name = f"bitbench_test_{os.getpid()}_{next(self._counter)}"
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}" TEMPLATE template0'))
        return self.url.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        with self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_server():
    """A URL of a PostgreSQL server for this session (skips or fails when there is none)."""
    existing = os.environ.get("BITBENCH_TEST_POSTGRES_URL")
    if existing:
        yield existing
        return
    bindir = find_postgres_bin()
    if bindir is None:
        msg = "PostgreSQL binaries not found (run scripts/system-deps.sh as root, or set BITBENCH_TEST_POSTGRES_URL)"
        if postgres_required():
            pytest.fail(msg + " and CI=true / BITBENCH_REQUIRE_POSTGRES=1 forbid skipping", pytrace=False)
        pytest.skip(msg)
    server = TempPostgres(bindir).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_databases(postgres_server):
    dbs = PostgresDatabases(postgres_server)
    yield dbs
    dbs.admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """An empty database: a SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bitbench.sqlite'}"
        return
    dbs = request.getfixturevalue("postgres_databases")
    url = dbs.new()
    yield url
    dbs.drop(url)


@pytest.fixture
def engine(db_url):
    """``db_url`` migrated to head."""
    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sessions(engine):
    return session_factory(engine)


@pytest.fixture
def session(sessions):
    with sessions() as s:
        yield s

"""Engines, sessions and migrations.

- ``make_engine(url)``: SQLite gets WAL, a 30 s busy timeout and foreign keys on every
  connection (and its directory is created; ``sqlite://`` is one in-memory database shared by
  all threads); ``postgresql://`` means psycopg 3.
- ``session_factory(engine)``: a ``sessionmaker`` whose objects survive commit.
- ``migrate(engine)``: Alembic ``upgrade head`` from the scripts shipped in
  ``service/migrations``; safe when several processes start at once (PostgreSQL: a session
  advisory lock; SQLite: an exclusive ``flock`` on ``<database>.migrate.lock``).
"""
from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
BUSY_TIMEOUT_S = 30
_PG_MIGRATE_LOCK = 0x6269_7462_656E_6368 & 0x7FFF_FFFF_FFFF_FFFF  # "bitbench", a bigint key


def _sqlite_path(url) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser().resolve()


def make_engine(url: str | URL, **kwargs) -> Engine:
    """An Engine for ``url`` with bitbench's connection settings (see module doc)."""
    u = make_url(url)
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() == "sqlite":
        path = _sqlite_path(u)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not u.database or u.database == ":memory:":  # one shared in-memory database, not one per thread
            kwargs.setdefault("poolclass", StaticPool)
        connect_args = {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False, **kwargs.pop("connect_args", {})}
        engine = create_engine(u, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    # WAL is a property of the file: set once. Switching fails at once ("database is locked",
    # no busy wait) while another connection writes, which can only happen on a new database.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while cur.execute("PRAGMA journal_mode").fetchone()[0] not in ("wal", "memory"):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cur.close()


def session_factory(engine: Engine) -> sessionmaker:
    """Sessions bound to ``engine``; loaded values stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic Config built in code (no alembic.ini) for the shipped migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


@contextlib.contextmanager
def _migration_lock(engine: Engine):
    """Hold the database-wide migration lock; yields a connection to migrate with."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            conn.commit()  # a session-level lock: it outlives the transaction
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATE_LOCK})
                conn.commit()
        return
    path = _sqlite_path(engine.url) if engine.dialect.name == "sqlite" else None
    if path is None:  # in-memory SQLite or another backend: nothing to race with here
        with engine.connect() as conn:
            yield conn
        return
    with open(f"{path}.migrate.lock", "a+b") as fh:  # lock first: the first connect creates the file
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default the newest); a no-op when it is there."""
    with _migration_lock(engine) as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision (None when never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest migration shipped with this code: what :func:`migrate` brings a database to."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no Alembic migrations shipped with this code")
    return head

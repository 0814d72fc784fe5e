"""What the store's modules share: rows to plain records, the session's dialect, an upsert, numbers
as SQL stores them."""
from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, Executable
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression


def plain(value: Any) -> Any:
    """A datetime as ISO-8601 text; anything else as it is."""
    return value.isoformat() if isinstance(value, datetime) else value


def record(row, fields: Iterable[str]) -> dict:
    """The row's ``fields`` as a plain dict."""
    m = row._mapping
    return {f: plain(m[f]) for f in fields}


def dialect(s: Session) -> str:
    """``"sqlite"`` or ``"postgresql"``."""
    return s.get_bind().dialect.name


def unindexed(s: Session, column):
    """``column`` for a WHERE term that must not choose the query's index. SQLite plans without statistics
    (nothing runs ANALYZE on it) and then prefers any equality term's index; its documented hint is a unary
    ``+`` on the column. Other dialects plan by their statistics: the column as it is."""
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=column.type) \
        if dialect(s) == "sqlite" else column


def upsert_insert(s: Session, table):
    """``INSERT`` that supports ``on_conflict_do_nothing`` / ``_do_update`` on this session's dialect."""
    return (postgresql if dialect(s) == "postgresql" else sqlite).insert(table)


def num(value) -> float | None:
    """A finite float, or None (NaN and ±inf are stored as NULL; numpy scalars become floats)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def jsonable(value):
    """Plain JSON: numpy scalars become Python numbers, non-finite floats None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def rowcount(s: Session, stmt: Executable) -> int:
    """Execute an UPDATE or DELETE and return how many rows it matched."""
    return cast(CursorResult, s.execute(stmt)).rowcount

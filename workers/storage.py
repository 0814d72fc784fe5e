"""Where Ray Tune keeps experiments: a local (or NFS) directory, or an object-store URI.

A location is a string. A URI (``scheme://…``: ``s3://bucket/prefix``, ``gs://…``, ``file:///…``,
anything pyarrow's filesystems take) passes through as given, less a trailing slash; any other
value is a path, made absolute (Tune needs that). No heavy imports: the service's settings use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_STORAGE = "~/.cache/bitbench/tune"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names a filesystem by scheme (``s3://…``) rather than a local path."""
    return bool(_SCHEME.match(str(location)))


def normalise(location: str | os.PathLike) -> str:
    """A URI without its trailing slash, or an absolute path with ``~`` expanded."""
    text = str(location)
    if is_uri(text):
        scheme, rest = text.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else text
    return str(Path(text).expanduser().resolve())


def resolve_storage(location: str | os.PathLike | None = None) -> str:
    """``location``, else $BITBENCH_TUNE_DIR, else ~/.cache/bitbench/tune; normalised."""
    return normalise(location or os.environ.get("BITBENCH_TUNE_DIR") or DEFAULT_STORAGE)


def join(location: str, name: str) -> str:
    """``location/name`` for a URI or a path alike."""
    return f"{location}/{name}" if is_uri(location) else str(Path(location, name))


def ensure_exists(location: str) -> None:
    """Create a local storage directory (and parents); object stores need nothing."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)

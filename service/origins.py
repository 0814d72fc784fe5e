"""Web origins (RFC 6454): ``scheme://host:port``, compared in one canonical spelling.

A browser names the page that sent a request in its ``Origin`` header (always on a cross-site
POST); the API lets a write through only from its own origin or an allowed one
(:func:`service.api.deps.same_origin_json`).
"""
from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_origin(text: str) -> str | None:
    """``text`` as ``scheme://host:port`` (lower case, the port spelled out), or None when it is not
    an http(s) origin: the ``null`` of sandboxed pages, a URL with a path, query or user name."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:  # a port out of range or not a number
        return None
    if (parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/")
            or parts.query or parts.fragment or "@" in parts.netloc):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORTS[parts.scheme]}"

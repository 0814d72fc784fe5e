"""What a failure shows its readers: the error's type and message with relative paths, no traceback.

Run and trial errors are public reads (``GET /runs/{id}``, ``/trials/{id}``, the dashboard). A
traceback there shows whoever reads it where the code, the Python installation and the data live
on the cluster; the full text belongs in the log of the process that saw it (the dispatcher's).
:func:`public_reason` is what the store keeps of an error.
"""
from __future__ import annotations

import os
import re
import sysconfig
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

MAX_CHARS = 2000
_FRAME = re.compile(r'^\s+File "[^"]*", line \d+')
_TUNE_HEADER = re.compile(r"^Failure # \d+ \(occurred at [^)]*\)\s*$")  # Ray Tune's error-file header
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its task names


def exception_lines(text: str) -> str:
    """The ``Type: message`` lines that end a Python traceback (Ray's task errors included), or
    ``text`` less Tune's ``Failure # n`` header when it holds no traceback."""
    lines = _ANSI.sub("", text).strip().splitlines()
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    if not frames:
        return "\n".join(line for line in lines if not _TUNE_HEADER.match(line)).strip()
    i = frames[-1] + 1
    while i < len(lines) and lines[i][:1].isspace():  # the frame's source line and its ^^^ markers
        i += 1
    return "\n".join(lines[i:]).strip() or lines[-1].strip()


@lru_cache(maxsize=8)
def _places(data_dir: str | None, home: str) -> tuple[tuple[str, str], ...]:
    """(absolute directory, what it becomes), longest first: source trees vanish (their files read
    as ``workers/train.py``, ``torch/nn/…``), the data directory and home get a name."""
    from workers.data.registry import resolve_data_dir  # the trials' default; imports torch, so late

    sources = [Path(__file__).parents[1], *(Path(sysconfig.get_path(p)) for p in ("purelib", "platlib", "stdlib"))]
    named: list[tuple[Path | str, str]] = [*((s, "") for s in sources), (resolve_data_dir(data_dir), "<data dir>"),
                                           (home, "~")]
    places: dict[str, str] = {}
    for path, name in named:
        for spelling in {str(Path(path).absolute()), str(Path(path).resolve())}:  # as imported, and real
            places.setdefault(spelling, name)
    return tuple(sorted(places.items(), key=lambda kv: -len(kv[0])))


def _replacement(name: str) -> Callable[[re.Match[str]], str]:
    """What a match of a place becomes: ``name/`` before a path under it, ``name`` (or ``.``) alone."""
    return lambda m: (name + "/" if name else "") if m.group(1) else name or "."


def relative_paths(text: str) -> str:
    """``text`` with the absolute paths under the places of :func:`_places` made relative."""
    for place, name in _places(os.environ.get("BITBENCH_DATA_DIR"), str(Path.home())):
        if place in ("", "/"):
            continue
        # the place itself, or the place and a path under it; not a longer name that starts alike
        text = re.sub(re.escape(place) + r"(/|(?![\w.-]))", _replacement(name), text)
    return text


def public_reason(error: str | None) -> str | None:
    """An error as readers see it: :func:`exception_lines`, :func:`relative_paths`, at most
    ``MAX_CHARS`` (the end kept: it names the failure)."""
    if error is None:
        return None
    reason = relative_paths(exception_lines(error))
    return reason if len(reason) <= MAX_CHARS else "…" + reason[-(MAX_CHARS - 1):]

"""The packed file: one self-describing file per trial, and the bit-packing helpers.

Layout (little-endian)::

    b"BBPACK01"                       8-byte magic (format version 1)
    u32  header_len                   length of the JSON header in bytes
    header (UTF-8 JSON, space-padded so that the blob starts on a 64-byte boundary)
    blob: every array, each starting on a 64-byte boundary

The header holds the model description (``layers``, written by ``export``) and an ``arrays``
table ``name → {offset, dtype, shape}`` (offsets relative to the blob start). Arrays are read
back zero-copy with ``np.frombuffer``.

Bit planes: a boolean matrix (rows, K) is packed along K, bit k of row r at word k // 64, bit
k % 64 (LSB first), K padded with zero bits to a multiple of 64 → ``uint64`` (rows, ⌈K/64⌉).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

MAGIC = b"BBPACK01"
ALIGN = 64
WORD_BITS = 64


def words_for(k: int) -> int:
    """⌈k / 64⌉: the uint64 words holding k bits."""
    return -(-k // WORD_BITS)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array along its last axis into uint64 words (LSB first, zero-padded)."""
    bits = np.asarray(bits, dtype=bool)
    k = bits.shape[-1]
    pad = words_for(k) * WORD_BITS - k
    if pad:
        bits = np.concatenate([bits, np.zeros(bits.shape[:-1] + (pad,), bool)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view(np.uint64)


def unpack_bits(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint64 (..., W) → bool (..., k)."""
    b = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1, bitorder="little")
    return b[..., :k].astype(bool)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_packed(path: str | Path, header: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write ``header`` (JSON-ready) and ``arrays`` to ``path``; return the file size in bytes."""
    table, offset = {}, 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        table[name] = {"offset": offset, "dtype": a.dtype.str, "shape": list(a.shape)}
        offset = _aligned(offset + a.nbytes)
    text = json.dumps({**header, "arrays": table}, separators=(",", ":")).encode()
    start = _aligned(len(MAGIC) + 4 + len(text))
    text += b" " * (start - len(MAGIC) - 4 - len(text))
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(text)) + text)
        for name, a in arrays.items():
            f.seek(start + table[name]["offset"])
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(start + offset)
    return start + offset


def read_packed(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a packed file: (header, {name: read-only array})."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a bitbench packed file (magic {data[:8]!r}, expected {MAGIC!r})")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    head = len(MAGIC) + 4
    header = json.loads(data[head: head + n])
    start = head + n
    arrays = {}
    for name, spec in header["arrays"].items():
        dt = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        arrays[name] = np.frombuffer(data, dt, count, start + spec["offset"]).reshape(spec["shape"])
    return header, arrays

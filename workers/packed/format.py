"""The packed file: one self-describing file per trial, its typed layer records, and bit packing.

Layout (little-endian)::

    b"BBPACK01"                       8-byte magic (format version 1)
    u32  header_len                   length of the JSON header in bytes
    header (UTF-8 JSON, space-padded so that the blob starts on a 64-byte boundary)
    blob: every array, each starting on a 64-byte boundary

The header holds the model description (a :class:`PackedHeader`: format, record ``version``,
``layers`` = :class:`LayerRecord` dicts, written by ``export`` and read by ``engine``) and an
``arrays`` table ``name → {offset, dtype, shape}`` (offsets relative to the blob start). Arrays
are read back zero-copy with ``np.frombuffer``. The magic's "01" is the container layout; the
record ``version`` (2; version-1 files of issue 7 are still read) changes when record keys do; an
optional key added since (``steps``, issue 16) is written only where used, so files without it read as
before and a reader without it refuses a file that has it (a malformed-record error, never a misreading).

Bit planes: a boolean matrix (rows, K) is packed along K, bit k of row r at word k // 64, bit
k % 64 (LSB first), K padded with zero bits to a multiple of 64 → ``uint64`` (rows, ⌈K/64⌉).
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
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


# -- the layer record (the header's "layers") ---------------------------------------------------
FORMAT = "bitbench-packed"
VERSION = 2  # 1: issue 7's untyped records (read through :func:`_v1_layer`); 2: these dataclasses
ENCODINGS = ("float", "sign", "ternary", "pow2")
STATS = ("per_sample", "constant")


@dataclass(frozen=True)
class Encoding:
    """How one operand of a layer (its input or its weights) is coded.

    Levels are integers i with |i| ≤ ``max_int``, worth i·``unit``: float (no levels), sign ±1,
    ternary {−1, 0, 1}, pow2 {0, ±2^e}. Input quantizers run at inference: ternary non-zero ⇔
    |x| > Δ with Δ = ``delta_ratio``·mean|x|; pow2 code j = #{t ∈ ``thresholds`` : t ≤ |x|/max|x|}.
    ``stats`` says where Δ and max|x| come from: "per_sample" (each sample's own, as torch's eval
    mode computes them) or "constant" (the layer's frozen running estimate ``reference``: mean|x| for
    ternary, so Δ = ``delta_ratio``·reference; max|x| for pow2), as torch's eval mode with ``act_stats=running``.
    """

    enc: str
    bits: int
    unit: float = 1.0
    max_int: int = 1
    delta_ratio: float | None = None
    thresholds: tuple[float, ...] | None = None
    stats: str = "per_sample"
    reference: float | None = None

    def __post_init__(self):
        if self.enc not in ENCODINGS:
            raise ValueError(f"unknown encoding {self.enc!r}; known: {', '.join(ENCODINGS)}")
        if self.stats not in STATS:
            raise ValueError(f"unknown statistics {self.stats!r}; known: {', '.join(STATS)}")
        if (self.stats == "constant") != (self.reference is not None):
            raise ValueError("a reference value goes with stats='constant' and only with it")
        if self.thresholds is not None:
            object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

    @property
    def is_float(self) -> bool:
        return self.enc == "float"


FLOAT = Encoding("float", 32)


@dataclass(frozen=True)
class WeightArrays:
    """Names of a layer's weight arrays in the file: the sign plane ``neg`` (1 ⇔ negative), the
    ternary non-zero plane ``nz``, the pow2 code bit planes ``code`` (LSB first; code c → 2^(c−1),
    0 → 0), or float32 ``values`` (out, K) of a float layer."""

    neg: str | None = None
    nz: str | None = None
    code: tuple[str, ...] = ()
    values: str | None = None

    def names(self) -> list[str]:
        return [n for n in (self.neg, self.nz, *self.code, self.values) if n is not None]


@dataclass(frozen=True)
class Affine:
    """Per-channel float32 z = y·alpha + beta (eval-mode BatchNorm): array names."""

    alpha: str
    beta: str


@dataclass(frozen=True)
class Threshold:
    """A folded sign threshold: next input negative ⇔ NOT((A ≥ u) XOR g); array names (int32, uint8)."""

    u: str
    g: str


@dataclass(frozen=True)
class Steps:
    """A folded constant-statistic ternary / powers-of-two next quantizer with ``levels`` = q magnitudes:
    c = #{i : A ≥ t[i, o]} over the int32 array ``t`` (2q, out) (rows ascending), level index
    ℓ = c − q, or q − c where the uint8 array ``g`` (out,) is 1; the next input is sign(ℓ)·2^(|ℓ|−1) in
    its own units (ternary: ℓ itself). Array names."""

    t: str
    g: str
    levels: int


@dataclass(frozen=True)
class LayerRecord:
    """One conv / linear layer and what follows its accumulator, as written by ``export`` and run by ``engine``.

    Geometry: ``kind`` conv (``kernel``, ``stride``, ``padding``, each (h, w)) or linear; ``fan_in``
    input channels / features, ``out`` outputs, ``K`` = im2col row length (tap-major: kh, kw, C),
    ``words`` = ⌈K/64⌉; ``flatten_channels`` = C when a linear layer reads a flattened C-channel conv
    output (its columns are in NHWC order). Arithmetic: accumulator A in units of ``unit`` (= input
    unit × weight unit), |A| ≤ ``a_max`` (None: a float layer). After A, in order: ``bias`` (array
    name), max-pool ``pool`` (kernel = stride), ``bn`` (:class:`Affine`), ``hardtanh`` (clip to
    [−1, 1]) — or all of them folded into the next sign quantizer as ``fold`` (:class:`Threshold`), or
    into the next constant-statistic ternary / powers-of-two quantizer as ``steps`` (:class:`Steps`; the
    key is left out of the JSON when absent, so files without such folds read as before).
    """

    name: str
    kind: str
    fan_in: int
    out: int
    K: int
    words: int
    input: Encoding
    weight: Encoding
    weight_arrays: WeightArrays
    unit: float
    a_max: int | None
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    padding: tuple[int, int] | None = None
    flatten_channels: int | None = None
    pool: int | None = None
    bias: str | None = None
    bn: Affine | None = None
    hardtanh: bool = False
    fold: Threshold | None = None
    steps: Steps | None = None

    def __post_init__(self):
        if self.fold is not None and self.steps is not None:
            raise ValueError(f"{self.name}: a layer folds into a sign threshold or into steps, not both")
        if self.kind not in ("conv", "linear"):
            raise ValueError(f"{self.name}: unknown layer kind {self.kind!r}; known: conv, linear")
        for f in ("kernel", "stride", "padding"):
            v = getattr(self, f)
            if (v is None) == (self.kind == "conv"):
                raise ValueError(f"{self.name}: {f} goes with conv layers and only with them")
            if v is not None:
                object.__setattr__(self, f, (int(v[0]), int(v[1])))

    @property
    def conv(self) -> bool:
        return self.kind == "conv"

    def array_names(self) -> list[str]:
        nested = [x for part in (self.bn, self.fold) if part is not None for x in asdict(part).values()]
        nested += [self.steps.t, self.steps.g] if self.steps else []
        return self.weight_arrays.names() + ([self.bias] if self.bias else []) + nested

    def to_json(self) -> dict:
        d = asdict(self)
        if d["steps"] is None:
            del d["steps"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> LayerRecord:
        d = dict(d)
        d["input"], d["weight"] = Encoding(**d["input"]), Encoding(**d["weight"])
        d["weight_arrays"] = WeightArrays(**{**d["weight_arrays"], "code": tuple(d["weight_arrays"].get("code", ()))})
        d["bn"] = Affine(**d["bn"]) if d.get("bn") else None
        d["fold"] = Threshold(**d["fold"]) if d.get("fold") else None
        d["steps"] = Steps(**d["steps"]) if d.get("steps") else None
        return cls(**d)


@dataclass(frozen=True)
class PackedHeader:
    """The file's header: format name and record version, the input shape (C, H, W) when known,
    the number of classes, the layers in forward order."""

    layers: tuple[LayerRecord, ...]
    num_classes: int
    input_shape: tuple[int, int, int] | None = None
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict:
        return {"format": self.format, "version": self.version,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "num_classes": self.num_classes, "layers": [r.to_json() for r in self.layers]}

    @classmethod
    def from_json(cls, d: dict) -> PackedHeader:
        """Parse a header of version 1 or 2; anything else raises ValueError naming what was found."""
        if d.get("format") != FORMAT:
            raise ValueError(f"header format {d.get('format')!r} is not {FORMAT!r}")
        version = d.get("version")
        if version not in (1, VERSION):
            raise ValueError(f"packed record version {version!r} is not supported (this engine reads 1 and {VERSION})")
        try:
            layers = tuple(LayerRecord.from_json(_v1_layer(r) if version == 1 else r) for r in d["layers"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed version-{version} layer record: {e}") from None
        shape = d.get("input_shape")
        return cls(layers, int(d["num_classes"]), tuple(shape) if shape else None)


def _v1_layer(r: dict) -> dict:
    """A version-1 layer dict (issue 7) in version 2's keys."""
    w = dict(r["weight"])
    arrays = w.pop("arrays")
    fold = r.get("fold")
    keep = ("name", "kind", "out", "K", "words", "flatten_channels", "pool", "hardtanh", "bias", "bn", "unit", "a_max")
    conv = {k: r[k] for k in ("kernel", "stride", "padding")} if r["kind"] == "conv" else {}
    return {**{k: r[k] for k in keep}, **conv, "fan_in": r["in"], "input": r["input"], "weight": w,
            "weight_arrays": {"neg": arrays.get("neg"), "nz": arrays.get("nz"), "code": arrays.get("code", ()),
                              "values": arrays.get("float")},
            "fold": {"u": fold["U"], "g": fold["g"]} if fold else None}


def save_packed(path: str | Path, header: PackedHeader, arrays: dict[str, np.ndarray]) -> int:
    """Write a typed header and its arrays (every name the layers refer to must be there)."""
    missing = [n for r in header.layers for n in r.array_names() if n not in arrays]
    if missing:
        raise ValueError(f"layer records name arrays that are not written: {missing[:8]}")
    return write_packed(path, header.to_json(), arrays)


def load_packed(path: str | Path) -> tuple[PackedHeader, dict[str, np.ndarray]]:
    """Read a packed file as (typed header, {name: read-only array})."""
    raw, arrays = read_packed(path)
    header = PackedHeader.from_json(raw)
    missing = [n for r in header.layers for n in r.array_names() if n not in arrays]
    if missing:
        raise ValueError(f"{path}: layer records name arrays the file does not hold: {missing[:8]}")
    return header, arrays

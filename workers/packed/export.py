"""Export a trained low-bit model (eval mode) to one packed file; measure it against torch.

Supported: ``nn.Sequential`` nets (nested allowed) of QConv2d / QLinear (or plain Conv2d /
Linear = float), MaxPool2d (kernel = stride, no padding), BatchNorm, HardTanh(−1, 1) and
Flatten — every plain ConvNet of the registry (digits_net, fashion_net, convnet_a–d,
vgg_small). Quantizers must declare a packed code (``Estimator.packed_encoding()``: MINW-Net's
unscaled sign, ternary, powers of two ≤ 4 bits — estimators aqe, ste, clipped_ste, approx_sign,
ede, reste, and xnor's activations); anything else raises :class:`UnsupportedModelError`.
Each layer becomes a :class:`~workers.packed.format.LayerRecord`.

Weight encodings over the im2col K axis (tap-major: kh, kw, C; a linear layer after a conv
takes its columns in NHWC-flatten order), each plane packed 64 per uint64, rows padded:
  sign     1 plane: n (1 ⇔ −1)                                                 1 bit/weight
  ternary  2 planes: n, nz (1 ⇔ ≠ 0)                                          2 bits/weight
  pow2     n + (b−1) planes of the code c: 0 → 0, c → 2^(c−q) (3 bits: 1 → ¼, 2 → ½, 3 → 1)
  float    float32 (the model's float first/last layer)
"""
from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from estimators import QConv2d, QLinear
from estimators.base import Estimator
from estimators.quantizers import pow2_thresholds
from workers.models import trial_model

from .fold import bn_affine, level_thresholds, sign_threshold
from .format import (
    FLOAT,
    Affine,
    Encoding,
    LayerRecord,
    PackedHeader,
    Steps,
    Threshold,
    WeightArrays,
    pack_bits,
    save_packed,
    words_for,
)

MAX_POW2_BITS = 4  # int32 accumulators: K·2^(q−1)·2^(q−1) < 2^31


class UnsupportedModelError(ValueError):
    """The model (layout or quantizer) has no exact packed form; the message says what is missing."""


@dataclass
class ExportReport:
    """What was written. Bytes: ``payload_bytes`` = all weight arrays (packed planes with their row
    padding, plus float32 weights of float layers); ``file_bytes`` = the whole file (header,
    thresholds/BN, alignment). ``weight_bits`` = Σ numel·w_bits over quantized kernels (the
    paper's parameter capacity); compression = float32 size of all kernels / bytes."""

    path: str
    file_bytes: int
    payload_bytes: int
    weight_bits: int
    quantized_weights: int
    float_weights: int
    float32_bytes: int
    layers: list[dict] = field(default_factory=list)

    @property
    def weight_mib(self) -> float:
        return self.weight_bits / 8 / 2**20

    @property
    def payload_mib(self) -> float:
        return self.payload_bytes / 2**20

    @property
    def compression(self) -> float:
        """float32 kernel bytes / packed weight payload bytes."""
        return self.float32_bytes / self.payload_bytes

    @property
    def file_compression(self) -> float:
        return self.float32_bytes / self.file_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "weight_mib": self.weight_mib, "payload_mib": self.payload_mib,
                "compression": self.compression, "file_compression": self.file_compression}


# -- model walking --------------------------------------------------------------------------
def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named leaf modules in forward order; only nn.Sequential containers are opened."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) or not list(module.children()):
        return [("", module)]
    if type(module) is not nn.Sequential:
        raise UnsupportedModelError(
            f"packed export handles nn.Sequential nets of conv/linear, MaxPool2d, BatchNorm, Hardtanh, Flatten; "
            f"got a {type(module).__name__} with its own forward()")
    return [(f"{name}.{sub}".strip("."), m) for name, child in module.named_children() for sub, m in _leaves(child)]


def _blocks(model: nn.Module) -> list[dict]:
    """Group leaves into blocks: layer, [MaxPool2d], [BatchNorm], [Hardtanh], [Flatten]."""
    order = {nn.MaxPool2d: 1, nn.BatchNorm1d: 2, nn.BatchNorm2d: 2, nn.Hardtanh: 3, nn.Flatten: 4}
    blocks: list[dict] = []
    for name, m in _leaves(model):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            blocks.append({"name": name, "layer": m, "rank": 0})
            continue
        if isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        rank = next((r for t, r in order.items() if isinstance(m, t)), None)
        if rank is None:
            raise UnsupportedModelError(f"{name}: {type(m).__name__} has no packed form")
        if rank == 4 and not blocks:  # flatten of the raw input
            continue
        if not blocks or rank <= blocks[-1]["rank"]:
            raise UnsupportedModelError(
                f"{name}: {type(m).__name__} out of the order layer – pool – BN – HardTanh")
        blocks[-1]["rank"] = rank
        blocks[-1][{1: "pool", 2: "bn", 3: "hardtanh", 4: "flatten"}[rank]] = m
    if not blocks:
        raise UnsupportedModelError("no conv or linear layer to export")
    return blocks


def _check_modules(b: dict) -> None:
    layer, name = b["layer"], b["name"]
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or tuple(layer.dilation) != (1, 1)
                                          or layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        raise UnsupportedModelError(f"{name}: only groups=1, dilation=1, numeric zero padding are packed")
    pool = b.get("pool")
    if pool is not None:
        k, s = pool.kernel_size, pool.stride
        if not (isinstance(k, int) and s in (k, (k, k))) or pool.padding not in (0, (0, 0)) or pool.ceil_mode \
                or pool.dilation not in (1, (1, 1)):
            raise UnsupportedModelError(f"{name}: only MaxPool2d(k) with stride k, no padding, floor mode")
    ht = b.get("hardtanh")
    if ht is not None and (ht.min_val, ht.max_val) != (-1.0, 1.0):
        raise UnsupportedModelError(f"{name}: Hardtanh must clip to [−1, 1]")
    fl = b.get("flatten")
    if fl is not None and (fl.start_dim, fl.end_dim) != (1, -1):
        raise UnsupportedModelError(f"{name}: only Flatten(1, −1)")


def _encoding(q: Estimator | None, name: str) -> Encoding:
    """The packed encoding a quantizer declares (``q.packed_encoding()``), with its run-time parameters."""
    if q is None:
        return FLOAT
    enc = q.packed_encoding()
    stats = q.hparams.get("act_stats", "per_sample") if q.role == "activation" else "per_sample"
    if enc is None and stats == "per_batch":  # the estimator declines it (estimators.minw.packed_encoding)
        raise UnsupportedModelError(f"{name}: {q.name!r} activation statistics 'per_batch' have no packed code "
                                    "(a prediction would depend on its batch; use per_sample or running)")
    constant = {}  # a running estimate is frozen in eval: the layer's constant statistic
    if getattr(q, "tracks_running_stat", False):
        if not bool(q.running_stat_set):
            raise UnsupportedModelError(f"{name}: the running activation statistic was never estimated (train the "
                                        "model first: until then eval mode takes it from each batch)")
        constant = {"stats": "constant", "reference": float(q.running_stat)}
    if enc == "sign":
        return Encoding("sign", 1)
    if enc == "ternary":
        return Encoding("ternary", 2, delta_ratio=float(q.hparams["delta_ratio"]), **constant)
    if enc == "pow2":
        if q.bits > MAX_POW2_BITS:
            raise UnsupportedModelError(f"{name}: powers of two above {MAX_POW2_BITS} bits overflow int32 accumulators")
        qn = 2 ** (q.bits - 1) - 1
        return Encoding("pow2", q.bits, unit=2.0 ** -(qn - 1), max_int=2 ** (qn - 1),
                        thresholds=tuple(q.hparams["pow2_thresholds"] or pow2_thresholds(q.bits)), **constant)
    raise UnsupportedModelError(
        f"{name}: estimator {q.name!r} ({q.role}, {q.bits} bits) quantizes to levels the packed format has no code "
        "for (packed export needs a quantizer that declares one: MINW-Net's sign / ternary / powers of two without "
        "a scale — aqe, ste, clipped_ste, approx_sign, ede, reste, and xnor's activations)")


def _weight_matrix(b: dict, flatten_channels: int | None) -> torch.Tensor:
    """The eval-mode quantized weight as (out, K), K in the engine's order."""
    layer = b["layer"]
    w = (layer.quantized_weight() if isinstance(layer, (QConv2d, QLinear)) else layer.weight).detach().double()
    if w.dim() == 4:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (O, kh, kw, C)
    if flatten_channels:
        o, k = w.shape
        return w.reshape(o, flatten_channels, k // flatten_channels).transpose(1, 2).reshape(o, k)  # CHW → HWC
    return w


def _encode_weights(prefix: str, w: np.ndarray, enc: Encoding, arrays: dict) -> WeightArrays:
    """Quantized weight values → packed planes in ``arrays``; returns the names."""
    if enc.is_float:
        arrays[f"{prefix}.float"] = w.astype(np.float32)
        return WeightArrays(values=f"{prefix}.float")
    ints = w / enc.unit
    mag = np.abs(ints)
    if enc.enc == "pow2":
        code = np.where(mag > 0, np.log2(np.where(mag > 0, mag, 1)) + 1, 0)
        ok = (code == np.round(code)) & (code >= 0) & (code <= np.log2(enc.max_int) + 1)
    else:
        ok = (mag == 1) | ((mag == 0) & (enc.enc == "ternary"))
    if not ok.all():
        raise UnsupportedModelError(f"{prefix}: weights off the {enc.enc} levels, e.g. {w[~ok][:4]}")
    names = WeightArrays(neg=f"{prefix}.neg")
    arrays[names.neg] = pack_bits(w < 0)
    if enc.enc == "ternary":
        names = WeightArrays(neg=names.neg, nz=f"{prefix}.nz")
        arrays[names.nz] = pack_bits(w != 0)
    elif enc.enc == "pow2":
        code = code.astype(np.int64)
        names = WeightArrays(neg=names.neg, code=tuple(f"{prefix}.code{i}" for i in range(enc.bits - 1)))
        for i, nm in enumerate(names.code):
            arrays[nm] = pack_bits((code >> i) & 1)
    return names


def _geometry(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        return {"kind": "conv", "fan_in": layer.in_channels, "out": layer.out_channels, "kernel": layer.kernel_size,
                "stride": layer.stride, "padding": layer.padding}
    return {"kind": "linear", "fan_in": layer.in_features, "out": layer.out_features}


def _layer_record(i: int, b: dict, nxt: dict | None, flatten_channels: int | None, arrays: dict,
                  fold_levels: bool = True) -> LayerRecord:
    """The record (and arrays) of block ``b``; ``nxt`` is the following block or None; ``fold_levels``:
    fold a constant-statistic ternary / pow2 next quantizer into integer steps (else run it in float32)."""
    _check_modules(b)
    layer, p = b["layer"], f"L{i}"
    quantized = isinstance(layer, (QConv2d, QLinear))
    a_enc = _encoding(layer.input_quantizer.quantizer if quantized else None, f"{b['name']} input")
    w_enc = _encoding(layer.weight_quantizer if quantized else None, f"{b['name']} weight")
    w = _weight_matrix(b, flatten_channels).numpy()
    integer = not (a_enc.is_float or w_enc.is_float)
    unit = a_enc.unit * w_enc.unit if integer else 1.0
    a_max = w.shape[1] * a_enc.max_int * w_enc.max_int if integer else None
    if a_max is not None and a_max >= 2**31:
        raise UnsupportedModelError(f"{b['name']}: accumulator range {a_max} overflows int32")
    bias = bn = fold = steps = None
    if layer.bias is not None:
        bias = f"{p}.bias"
        arrays[bias] = layer.bias.detach().numpy().astype(np.float32)
    quantized_next = nxt is not None and isinstance(nxt["layer"], (QConv2d, QLinear))
    nq = nxt["layer"].input_quantizer.quantizer if quantized_next else None
    n_enc = _encoding(nq, f"{nxt['name']} input") if integer and nq is not None else None
    after = dict(a_max=a_max, unit=unit, spatial=isinstance(layer, nn.Conv2d), channels=w.shape[0], bias=layer.bias,
                 bn=b.get("bn"), hardtanh=b.get("hardtanh"), quantizer=nq)
    if n_enc is not None and n_enc.enc == "sign":
        u, g = sign_threshold(**after)
        fold = Threshold(u=f"{p}.U", g=f"{p}.g")
        arrays[fold.u], arrays[fold.g] = u, g.astype(np.uint8)
    elif n_enc is not None and n_enc.stats == "constant" and fold_levels:
        levels = 1 if n_enc.enc == "ternary" else len(n_enc.thresholds)
        t, g = level_thresholds(levels=levels, **after)
        steps = Steps(t=f"{p}.T", g=f"{p}.g", levels=levels)
        arrays[steps.t], arrays[steps.g] = t, g.astype(np.uint8)
    elif b.get("bn") is not None:
        bn = Affine(alpha=f"{p}.bn.alpha", beta=f"{p}.bn.beta")
        arrays[bn.alpha], arrays[bn.beta] = bn_affine(b["bn"])
    return LayerRecord(
        name=b["name"], **_geometry(layer), K=w.shape[1], words=words_for(w.shape[1]), input=a_enc, weight=w_enc,
        weight_arrays=_encode_weights(f"{p}.w", w, w_enc, arrays), unit=unit, a_max=a_max,
        flatten_channels=flatten_channels, pool=b["pool"].kernel_size if b.get("pool") is not None else None,
        bias=bias, bn=bn, hardtanh=b.get("hardtanh") is not None, fold=fold, steps=steps)


# -- public API ------------------------------------------------------------------------------
@torch.no_grad()
def export_model(model: nn.Module, path: str | Path, *, input_shape=None, fold_levels: bool = True) -> ExportReport:
    """Write ``model`` (its eval-mode behaviour; the model itself is not changed) to ``path``.

    ``fold_levels`` False keeps constant-statistic ternary / pow2 inputs as float32 BN + quantizer at run time
    (the layout before their integer steps; for comparisons)."""
    m = copy.deepcopy(model).cpu().eval()
    blocks = _blocks(m)
    arrays: dict[str, np.ndarray] = {}
    records, channels = [], None
    for i, b in enumerate(blocks):
        layer = b["layer"]
        fc = channels if isinstance(layer, nn.Linear) and channels and layer.in_features != channels else None
        records.append(_layer_record(i, b, blocks[i + 1] if i + 1 < len(blocks) else None, fc, arrays, fold_levels))
        channels = layer.out_channels if isinstance(layer, nn.Conv2d) else None
    wrec = [(r, r.weight.bits, r.out * r.K) for r in records]
    payload = sum(arrays[n].nbytes for r in records for n in r.weight_arrays.names())
    header = PackedHeader(tuple(records), num_classes=records[-1].out,
                          input_shape=tuple(input_shape) if input_shape else None)
    size = save_packed(path, header, arrays)
    summary = [{"name": r.name, "kind": r.kind, "out": r.out, "K": r.K, "words": r.words, "a": r.input.enc,
                "w": r.weight.enc, "folded": r.fold is not None or r.steps is not None} for r in records]
    return ExportReport(
        path=str(path), file_bytes=size, payload_bytes=payload,
        weight_bits=sum(bits * n for _, bits, n in wrec if bits < 32),
        quantized_weights=sum(n for _, bits, n in wrec if bits < 32),
        float_weights=sum(n for _, bits, n in wrec if bits == 32),
        float32_bytes=4 * sum(n for _, _, n in wrec), layers=summary)


def export_checkpoint(state: dict, spec, trial, path: str | Path, *, num_classes: int,
                      input_shape: tuple[int, int, int]) -> ExportReport:
    """Rebuild a trial's model (:func:`workers.models.trial_model`) from a checkpoint and export it.

    ``state``: the trainer's checkpoint state (its ``"model"`` entry is used) or a bare state_dict.
    """
    model = trial_model(spec, trial, num_classes=num_classes, input_shape=tuple(input_shape))
    model.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    return export_model(model, path, input_shape=input_shape)


@torch.no_grad()
def torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The model's eval-mode outputs on ``x`` (on the model's device), as float32 numpy."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        out = [model(x[s: s + batch_size].to(dev)).float().cpu() for s in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out).numpy()


def compare(model: nn.Module, x: torch.Tensor, *, threads: int | None = None) -> dict:
    """Export to a temporary file and run both: sizes, prediction agreement, logit differences."""
    from .engine import PackedNet

    fd, tmp = tempfile.mkstemp(suffix=".bbpack")
    os.close(fd)
    try:
        report = export_model(model, tmp)
        with PackedNet.load(tmp, threads=threads) as net:
            ours = net.logits(x.detach().cpu().numpy())
    finally:
        os.unlink(tmp)
    ref = torch_logits(model, x)
    diff = np.abs(ours - ref)
    return {"report": report, "logits": ours, "torch_logits": ref,
            "agreement": float((ours.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_diff": float(diff.max()), "scale": float(np.abs(ref).max()),
            "frac_close": float((diff.max(axis=1) <= 1e-4 * max(1.0, float(np.abs(ref).max()))).mean())}


def packed_summary(model: nn.Module, test_x: torch.Tensor, test_y: torch.Tensor, *, details: bool = False) -> dict:
    """For the trainer, at the end of a low-bit trial: ``{"packed_bytes", "packed_agreement"}``.

    packed_bytes = the exported file's size; packed_agreement = fraction of ``test_x`` where the
    packed engine's prediction equals the torch eval-mode model's. Both None when the model has
    no packed form (:class:`UnsupportedModelError`). ``details`` adds the engine's and torch's
    test accuracy, the largest logit difference and the payload size.
    """
    try:
        c = compare(model, test_x, threads=torch.get_num_threads())  # the trial's CPU share
    except UnsupportedModelError:
        return {"packed_bytes": None, "packed_agreement": None}
    out = {"packed_bytes": c["report"].file_bytes, "packed_agreement": c["agreement"]}
    if details:
        y = test_y.detach().cpu().numpy()
        out |= {"packed_test_acc": float((c["logits"].argmax(1) == y).mean()),
                "torch_test_acc": float((c["torch_logits"].argmax(1) == y).mean()),
                "max_abs_logit_diff": c["max_abs_diff"], "packed_payload_bytes": c["report"].payload_bytes}
    return out

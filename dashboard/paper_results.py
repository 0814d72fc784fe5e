"""The paper's published accuracies, as reference points for figures and reports.

``dashboard/data/paper_minw.json``: Tables I and II (MINW-Net on the ConvNets, accuracy; M =
activation bits, N = weight bits, 16 and 32 mean floating point). ``paper_comparisons.json``:
Tables III–V (ResNet-110 / DenseNet-100 on CIFAR, AlexNet with BN and ResNet-18 on ImageNet,
with the comparison systems), one row per printed row with the printed error or loss. Both are
copied exactly from the paper; accuracies are derived here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


def _load(name: str) -> dict:
    return json.loads(resources.files("dashboard").joinpath(f"data/{name}").read_text("utf-8"))


@lru_cache(maxsize=1)
def paper_tables() -> dict:
    """The parsed ``paper_minw.json`` (cached; treat as read-only)."""
    return _load("paper_minw.json")


@lru_cache(maxsize=1)
def paper_comparisons() -> dict:
    """The parsed ``paper_comparisons.json`` (cached; treat as read-only)."""
    return _load("paper_comparisons.json")


def printed_accuracy(table: dict, value: float | None, key: str = "top1") -> float | None:
    """Accuracy (fraction) from a printed percentage: error e → 1 − e/100; loss l vs the table's
    float baseline b → (b − l)/100."""
    if value is None:
        return None
    if table["metric"] == "error":
        return round(1 - value / 100, 6)
    return round((table["baseline"][key] - value) / 100, 6)


def comparison_points(dataset: str | None, model: str | None) -> list[dict]:
    """Tables III–V rows for ``dataset`` and ``model``: ``[{w_bits, a_bits, acc, top5_acc,
    estimator, source, note}]`` (``estimator`` = the method name, or "float"; Table IV adds its
    float baseline as a "float" point)."""
    data = paper_comparisons()
    ds, mdl = (dataset or "").lower(), (model or "").lower()
    out = []
    for name, table in data["tables"].items():
        rows = [r for r in data["rows"] if r["table"] == name and (r["dataset"], r["model"]) == (ds, mdl)]
        if not rows:
            continue
        source = f"Table {name}"
        for r in rows:
            flags = [text for key, text in (("first_layer_float", "first layer float"),
                                             ("last_layer_float", "last layer float"),
                                             ("modified_architecture", "modified architecture")) if r.get(key)]
            out.append({"w_bits": r["w_bits"], "a_bits": r["a_bits"], "acc": printed_accuracy(table, r["top1"]),
                        "top5_acc": printed_accuracy(table, r["top5"], "top5"), "estimator": r["method"],
                        "source": source, "note": ", ".join([r["label"], *flags])})
        if "baseline" in table:
            base = table["baseline"]
            out.append({"w_bits": 32, "a_bits": 32, "acc": round(base["top1"] / 100, 6),
                        "top5_acc": round(base["top5"] / 100, 6), "estimator": "float",
                        "source": f"{source} baseline", "note": base.get("note", "")})
    return out


def paper_points(dataset: str | None, model: str | None) -> list[dict]:
    """Published accuracies for ``dataset`` and ``model``: Tables I–II (cifar10 | cifar100 on
    convnet_a..d) and Tables III–V (cifar10 | cifar100 on resnet110 / densenet100, imagenet on
    alexnet_bn / resnet18).

    Returns ``[{w_bits, a_bits, acc, estimator, source, ...}]`` with bits as printed for Tables
    I–II (16/32 = float) and as run (32 = float) for III–V; an empty list when the paper has no
    table for that dataset and model.
    """
    data = paper_tables()
    table = data["tables"].get((dataset or "").lower())
    column = {name: col for col, name in data["models"].items()}.get((model or "").lower())
    if table is None or column is None:
        return comparison_points(dataset, model)
    source = f"Table {table['table']}, Model {column}"
    return [
        {"w_bits": row["N"], "a_bits": row["M"], "acc": row["acc"][column],
         "estimator": row["estimator"], "source": source}
        for row in table["rows"]
    ]

"""The paper's published MINW-Net accuracies (Tables I and II), as reference points for figures.

The numbers live in ``dashboard/data/paper_minw.json``, copied exactly from the paper. In the
tables M = activation bits, N = weight bits; 16 and 32 mean floating point (not quantized).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def paper_tables() -> dict:
    """The parsed ``paper_minw.json`` (cached; treat as read-only)."""
    text = resources.files("dashboard").joinpath("data/paper_minw.json").read_text("utf-8")
    return json.loads(text)


def paper_points(dataset: str | None, model: str | None) -> list[dict]:
    """Published accuracies for ``dataset`` (cifar10 | cifar100) and ``model`` (convnet_a..d).

    Returns ``[{w_bits, a_bits, acc, estimator, source}]`` with bits as printed (16/32 = float);
    an empty list when the paper has no table for that dataset and model.
    """
    data = paper_tables()
    table = data["tables"].get((dataset or "").lower())
    column = {name: col for col, name in data["models"].items()}.get((model or "").lower())
    if table is None or column is None:
        return []
    source = f"Table {table['table']}, Model {column}"
    return [
        {"w_bits": row["N"], "a_bits": row["M"], "acc": row["acc"][column],
         "estimator": row["estimator"], "source": source}
        for row in table["rows"]
    ]

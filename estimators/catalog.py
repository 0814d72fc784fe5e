"""The estimator catalogue as Markdown, generated from the registry (README's block).

    python -m estimators.catalog            # print it
    python -m estimators.catalog --write README.md   # refresh the block between the markers
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from .base import estimator_catalog

START, END = "<!-- estimator-catalog:start -->", "<!-- estimator-catalog:end -->"


def _cell(text: str) -> str:
    """Escape a Markdown table cell's pipes."""
    return text.replace("|", r"\|")


def catalog_markdown() -> str:
    """One section per registered estimator: its formula (docstring), paper and parameters (default, the values
    :meth:`~estimators.base.Param.check` accepts, meaning)."""
    out = []
    for e in estimator_catalog():
        out.append(f"#### `{e['name']}`\n")
        out.append("```text\n" + e["formula"].strip() + "\n```\n")
        out.append(f"*{e['paper']}*" + (" · scheduled per epoch" if e["scheduled"] else "")
                   + (" · latent weights clipped to [−1, 1]" if e["clips_weights"] else "")
                   + " · grid" + ("s" if len(e["grids"]) > 1 else "") + ": " + ", ".join(f"`{g}`" for g in e["grids"])
                   + "\n")
        if e["params"]:
            out.append("| parameter | default | allowed | meaning |\n|---|---|---|---|")
            for k, p in e["params"].items():
                out.append(f"| `{k}` | `{p['default']}` | {_cell(p['allowed'])} | {_cell(p['doc'])} |")
            out.append("")
    return "\n".join(out).strip() + "\n"


def replace_block(text: str, block: str, start: str = START, end: str = END) -> str:
    """``text`` with the part between the markers ``start`` and ``end`` replaced by ``block``."""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"markers {start} … {end} not found")
    return pattern.sub(lambda _: f"{start}\n{block}{end}", text)


def block_cli(description: str, markdown: Callable[[], str], start: str = START, end: str = END) -> None:
    """``python -m <module> [--write FILE]``: print ``markdown()``, or refresh FILE's block between the markers."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--write", type=Path, help="file whose marked block to refresh (e.g. README.md)")
    a = ap.parse_args()
    if a.write:
        a.write.write_text(replace_block(a.write.read_text(), markdown(), start, end))
    else:
        print(markdown(), end="")


def main() -> None:
    block_cli(__doc__.splitlines()[0], catalog_markdown)


if __name__ == "__main__":
    main()

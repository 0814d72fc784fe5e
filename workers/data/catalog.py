"""The data sets' options as Markdown, generated from their models (README's block).

    python -m workers.data.catalog                    # print it
    python -m workers.data.catalog --write README.md  # refresh the block between the markers
"""
from __future__ import annotations

import json

from estimators.catalog import block_cli

from .registry import list_datasets, options_model

START, END = "<!-- dataset-options:start -->", "<!-- dataset-options:end -->"


def _bound(schema: dict) -> str:
    """A JSON schema's number bounds: ``≥ 0``, ``in [0, 1)``, ``≥ 0, ≤ 4294967295``."""
    low = (f"≥ {schema['minimum']}" if "minimum" in schema
           else f"> {schema['exclusiveMinimum']}" if "exclusiveMinimum" in schema else "")
    high = (f"≤ {schema['maximum']}" if "maximum" in schema
            else f"< {schema['exclusiveMaximum']}" if "exclusiveMaximum" in schema else "")
    if low.startswith("≥") and high.startswith("<"):
        return f"in [{schema['minimum']}, {schema['exclusiveMaximum']})"
    return ", ".join(b for b in (low, high) if b)


def describe(schema: dict) -> str:
    """A field's JSON schema in words: ``integer ≥ 1``, ``3 integers > 0``, ``integer ≥ 0 or number in [0, 1)``."""
    if "anyOf" in schema:
        return " or ".join(describe(s) for s in schema["anyOf"] if s.get("type") != "null")
    if schema.get("type") == "array":
        item = describe(schema["items"])
        n = schema.get("minItems")
        return f"{n} {item.replace('integer', 'integers').replace('number', 'numbers')}" \
            if n is not None and n == schema.get("maxItems") else f"list of {item}"
    return " ".join(p for p in (schema.get("type", "any"), _bound(schema)) if p)


def options_markdown() -> str:
    """One row per option: the data sets that take it, its default, its values and meaning."""
    names = list_datasets()
    takers: dict[str, list[str]] = {}
    fields = {}
    for name in names:
        model = options_model(name)
        props = model.model_json_schema()["properties"]
        for field, info in model.model_fields.items():
            takers.setdefault(field, []).append(name)
            fields[field] = (info, props[field])
    rows = ["| option | data sets | default | values | meaning |", "|---|---|---|---|---|"]
    for field, (info, schema) in fields.items():
        who = "all" if takers[field] == names else ", ".join(f"`{n}`" for n in takers[field])
        rows.append(f"| `{field}` | {who} | `{json.dumps(info.default)}` | {describe(schema)} | "
                    f"{(info.description or '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    block_cli(__doc__.splitlines()[0], options_markdown, START, END)


if __name__ == "__main__":
    main()

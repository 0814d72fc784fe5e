"""The import graph has no circles: imports flow estimators ← workers ← service (dashboard beside it).

Every ``import`` statement counts, including those inside functions (a lazy import is still a
circle: each side needs the other), except ``if TYPE_CHECKING:`` blocks. Importing ``a.b.c``
also imports the packages ``a`` and ``a.b``, except from inside them (a package's own modules).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("estimators", "workers", "service", "dashboard")


def modules(root: Path, packages) -> dict[str, Path]:
    """Dotted module name → file, for every .py file under the packages."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None) if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the project modules its import statements load."""
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                targets |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names}
        edges = set()
        for t in targets:
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                p = ".".join(parts[:i])
                if p in mods and p != name and not name.startswith(p + "."):
                    edges.add(p)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_has_no_import_circles():
    graph = import_graph(modules(ROOT, PACKAGES))
    assert graph["workers.train"] and graph["workers.packed.export"]  # the walk sees imports at all
    assert circles(graph) == []


def test_the_trainer_does_not_import_the_packed_engine():
    """The packed check reaches ``run_trial`` as a hook; the trainer names no ``workers.packed`` module."""
    graph = import_graph(modules(ROOT, PACKAGES))
    assert not {m for m in graph["workers.train"] if m.startswith("workers.packed")}


def test_a_lazy_import_circle_is_found(tmp_path):
    """A circle closed by a function-level import (the shape of issue 13's train ↔ packed) is reported;
    one closed only under TYPE_CHECKING is not, and a package importing its own modules is no circle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text("def f():\n    from .sub import g\n")
    (pkg / "sub" / "__init__.py").write_text("from .export import g\n")
    (pkg / "sub" / "export.py").write_text("from pkg.train import f\ndef g():\n    pass\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.other import x\n")
    (pkg / "other.py").write_text("from . import typed\n")
    assert circles(import_graph(modules(tmp_path, ["pkg"]))) == [["pkg.sub", "pkg.sub.export", "pkg.train"]]

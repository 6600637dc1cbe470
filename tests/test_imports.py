"""The package's import graph, function-local imports included, has no cycles. A function-local
import is kept only for an optional dependency (ray, peft) or a heavy one used by few commands
(sklearn, matplotlib, the HTTP stack, transformers for text stores), so `cdm` starts without them."""

from __future__ import annotations

import ast
from pathlib import Path

import cdm

PKG = Path(cdm.__file__).parent
LAZY_OK = {"peft", "ray", "sklearn", "matplotlib", "uvicorn", ".serve", "transformers"}  # transformers: text stores


def _modules() -> dict[str, ast.Module]:
    return {f.stem: ast.parse(f.read_text()) for f in sorted(PKG.glob("*.py"))}


def _imports(node: ast.AST) -> set[str]:
    """Sibling modules a node imports (`from .x import`, `from . import x`)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.level == 1:
            out |= {n.module.split(".")[0]} if n.module else {a.name for a in n.names}
    return out


def test_no_import_cycles():
    graph = {name: _imports(tree) - {name} for name, tree in _modules().items()}
    done, path = set(), []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done or m not in graph:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_function_local_imports_are_only_for_optional_or_heavy_dependencies():
    found = []
    for name, tree in _modules().items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                if isinstance(n, ast.Import):
                    found += [(name, a.name.split(".")[0]) for a in n.names]
                elif isinstance(n, ast.ImportFrom):
                    found.append((name, "." * n.level + (n.module or "").split(".")[0]))
    assert found and {dep for _, dep in found} <= LAZY_OK, sorted(set(found))

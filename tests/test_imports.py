"""The package's import structure: layers, no cycles, lazy imports only where they are worth it,
and commands that start in proportion to what they do (docs/architecture.md, "Layers")."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import cdm

PKG = Path(cdm.__file__).parent
# bottom to top: a module imports from its own layer and those below, never from one above
LAYERS = ["errors", "store", "models", "ingest", "training", "sampling", "evaluation", "serving", "app"]
LAZY_OK = {"peft", "ray", "sklearn", "matplotlib", "uvicorn", "transformers"}  # optional, or heavy and rarely used
LIGHT = ["--help", "key", "status", "items", "audit", "policy"]  # commands that import neither torch nor diffusers


def _modules() -> dict[str, ast.Module]:
    """Every module of the package, by dotted name under cdm ("store.registry")."""
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG).with_suffix("").parts
        out[".".join(parts)] = ast.parse(f.read_text())
    return out


def _imports(name: str, node: ast.AST) -> set[str]:
    """The package's modules a node imports (relative imports resolved; packages as themselves)."""
    here = name.split(".")[:-1]  # the package a relative import starts from ("app.__init__" -> app)
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and n.level:
            base = here[:len(here) - (n.level - 1)] if n.level > 1 else here
            mod = [*base, *(n.module.split(".") if n.module else [])]
            if n.module:
                out.add(".".join(mod))
            else:
                out |= {".".join([*mod, a.name]) for a in n.names}
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("cdm."):
            out.add(n.module[4:])
    return out


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0]) if module.split(".")[0] in LAYERS else len(LAYERS)


def test_modules_are_found_in_the_packages():
    mods = _modules()
    assert {m.split(".")[0] for m in mods} >= set(LAYERS) and "store.registry" in mods and "app.cli" in mods
    assert not [m for m in mods if "." not in m and m not in ("errors", "__init__", "__main__")], \
        "every module but errors lives in a layer's package"


def test_no_module_imports_from_a_layer_above_it():
    bad = [(m, d) for m, tree in _modules().items() for d in _imports(m, tree) if _layer(d) > _layer(m)]
    assert not bad, bad


def test_no_import_cycles():
    mods = _modules()
    graph = {name: {d for d in _imports(name, tree) if d in mods} - {name} for name, tree in mods.items()}
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


def test_light_commands_import_neither_torch_nor_diffusers(tmp_path):
    """`cdm --help`, `key`, `status`, `items`, `audit` and `policy` run without torch or
    diffusers (the CLI reaches heavy layers through `api`, on first use)."""
    from cdm.app import api

    api.init_store(tmp_path / "s").close()
    args = {"--help": ["--help"], "key": ["key", "--user", "a"], "policy": ["policy", str(tmp_path / "s")],
            **{c: [c, str(tmp_path / "s")] for c in ("status", "items", "audit")}}
    probe = ("import json, sys\nfrom cdm.app.cli import app\nsys.argv = ['cdm', *json.loads(sys.argv[1])]\n"
             "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print(json.dumps(sorted(m for m in ('torch', 'diffusers') if m in sys.modules)), file=sys.stderr)")
    for cmd in LIGHT:
        r = subprocess.run([sys.executable, "-c", probe, json.dumps(args[cmd])], capture_output=True, text=True)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        assert json.loads(r.stderr.strip().splitlines()[-1]) == [], cmd


def test_the_api_exports_resolve():
    from cdm.app import api

    for name in api.EXPORTS:
        assert getattr(api, name) is not None, name

"""The house rules that keep the code easy to change, checked on the source (no imports run): no module of
stackgan_dist over 450 lines and trainer.py at most 300; no import cycle between modules of stackgan_dist
(imports inside functions count too); no test module imports another (shared fixtures live in conftest.py,
shared helpers in *_helpers.py)."""
from __future__ import annotations

import ast
import os

from conftest import REPO

PKG = os.path.join(REPO, "stackgan_dist")


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    out = {}
    for dp, _dirs, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), REPO)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dp, f)
    return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, relative imports resolved; ``from .x import y`` counts x.y when
    y is a module, else x."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join((base[: len(base) - node.level + 1] if node.level else []) + ([node.module] if node.module
                                                                                           else []))
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                out.add(sub if sub in known else mod)
    return {m for m in out if m in known and m != name}


def test_no_module_of_the_package_is_over_its_size():
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in _modules().items()}
    over = {m: n for m, n in sizes.items() if n > 450}
    assert not over, f"modules over 450 lines: {over}"
    assert sizes["stackgan_dist.trainer"] <= 300, sizes["stackgan_dist.trainer"]


def test_no_import_cycle_in_the_package():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a module importing its own package's __init__ (or the reverse) is how packages work, not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".") and not d.startswith(m + ".")} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_test_module_imports_another():
    tests = os.path.join(REPO, "tests")
    names = {f[:-3] for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py")}
    bad = []
    for f in sorted(os.listdir(tests)):
        if not f.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(tests, f), encoding="utf-8").read())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{f} imports {m}" for m in mods if m in names]
    assert not bad, bad

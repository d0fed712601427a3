"""The package's shape: data flows one way, with no import cycle and no private cross-import.

The layers are read from the import-linter contract in pyproject.toml (what `lint-imports` checks in
`make test`); these tests check the same rule with an independent implementation on grimp's graph,
and show on a made-up graph that the checks can fail.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tl_skill"


def contract_layers() -> list[list[str]]:
    """The layers of the contract, top first; each a list of independent modules."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    return [[m.strip() for m in layer.split("|")] for layer in contract["layers"]]


def layer_of(module: str, layers: list[list[str]]) -> tuple[int, str] | None:
    """(index of the layer holding `module`, the layer's member it belongs to), or None (the package face)."""
    for i, layer in enumerate(layers):
        for member in layer:
            if module == member or module.startswith(member + "."):
                return i, member
    return None


def upward_or_sideways(edges: list[tuple[str, str]], layers: list[list[str]]) -> list[tuple[str, str]]:
    """Imports that break the contract: into a higher layer, or into a sibling of the same layer."""
    bad = []
    for importer, imported in edges:
        a, b = layer_of(importer, layers), layer_of(imported, layers)
        if a is None or b is None or a[1] == b[1]:
            continue
        if b[0] < a[0] or (b[0] == a[0] and a[1] != b[1]):
            bad.append((importer, imported))
    return bad


def cycles(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def edges() -> list[tuple[str, str]]:
    graph = grimp.build_graph("tl_skill", cache_dir=None)
    out = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported.startswith("tl_skill"):
                out.append((module, imported))
    return out


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").exists()


def test_no_import_cycle(edges):
    # a package's __init__ re-exports its modules: those edges point down into the package, and a module
    # importing its own package back would close a cycle
    assert cycles(edges) == []


def test_no_upward_or_sideways_import(edges):
    layers = contract_layers()
    assert len(layers) >= 10
    assert upward_or_sideways(edges, layers) == []


def test_every_module_is_in_a_layer(edges):
    layers = contract_layers()
    modules = {m for e in edges for m in e} | {
        ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
    }
    outside = sorted(m for m in modules if m not in ("tl_skill", "tl_skill.__main__") and layer_of(m, layers) is None)
    assert outside == []


def test_the_checks_can_fail():
    layers = [["pkg.top"], ["pkg.a", "pkg.b"], ["pkg.low"]]
    assert upward_or_sideways([("pkg.low.x", "pkg.top.y")], layers) == [("pkg.low.x", "pkg.top.y")]
    assert upward_or_sideways([("pkg.a", "pkg.b.z")], layers) == [("pkg.a", "pkg.b.z")]
    assert upward_or_sideways([("pkg.top", "pkg.low"), ("pkg.a.x", "pkg.a.y")], layers) == []
    assert cycles([("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]) == [["a", "b", "c"]]
    assert cycles([("a", "b"), ("b", "c")]) == []


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node, parents


def _module_of(node: ast.ImportFrom, path: Path) -> str:
    if node.level == 0:
        return node.module or ""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    base = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def test_no_private_name_crosses_a_module_boundary():
    crossings = []
    for path in PACKAGE.rglob("*.py"):
        here = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node, _ in _imports(path):
            source = _module_of(node, path)
            if not source.startswith("tl_skill") or source == here:
                continue
            crossings += [
                f"{here} imports {source}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    assert crossings == []


def test_package_imports_are_at_module_level():
    """Imports inside functions hide edges from readers; only the package's own modules are checked."""
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        for node, parents in _imports(path):
            if not _module_of(node, path).startswith("tl_skill"):
                continue
            p = parents.get(node)
            while p is not None and not isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Module)):
                p = parents.get(p)
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert hidden == []

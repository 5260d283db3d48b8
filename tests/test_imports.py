"""Every module under scope/ imports, and the module graph has no cycle (imports run one way).

The graph is read with ``ast`` from the source, so a cycle hidden in a function-level (lazy) import counts
too; imports under ``if TYPE_CHECKING:`` do not run and are left out. An edge goes to the most specific
module an import names: ``import a.b`` and ``from a import b`` (b a module) point at ``a.b``, ``from a.b
import name`` at ``a.b``. Importing a submodule also runs its parent package's ``__init__``; that is not
counted as an edge, since every package that re-exports its submodules would otherwise be a cycle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "scope"
# The package map of docs/architecture.md, lowest layer first: a part may import its own layer and those below.
LAYERS = [{"scope", "errors", "files"}, {"models", "hooks", "data"}, {"store"}, {"dictionaries", "analysis", "steering"},
          {"training", "evals", "dashboards"}, {"quickstart"}, {"cli", "__main__"}]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes of a module, skipping the bodies of ``if TYPE_CHECKING:`` (their else branch runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The scope modules one import statement points at."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if node.level:  # relative: resolved against the importing module's package
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        source = f"{base}.{node.module}" if node.module else base
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        if sub in MODULES:
            found.add(sub)
        elif source in MODULES:
            found.add(source)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the scope modules it imports (itself excluded)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {t for node in _imports(tree) for t in _targets(name, node)} - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path back to its start) per strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph is a few hundred modules, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path start -> ... -> start inside one strongly connected component (breadth-first, so a short one)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cli_imports_run_one_way():
    # command modules -> common; the assembler (scope/cli/__init__.py) -> command modules; only entry points
    # import the assembler, and the library imports no part of the CLI
    graph = import_graph()
    entry_points = {"scope.__main__", "scope.cli.__main__", "scope.cli.reference"}
    commands = {m for m in graph if m.startswith("scope.cli.")} - entry_points - {"scope.cli.common"}
    assert {m for m, targets in graph.items() if "scope.cli" in targets} == entry_points
    assert commands <= graph["scope.cli"]
    for m in commands:
        assert {t for t in graph[m] if t.startswith("scope.cli")} == {"scope.cli.common"}, m
    assert not {t for t in graph["scope.cli.common"] if t.startswith("scope.cli")}
    library = {m for m in graph if not m.startswith("scope.cli") and m != "scope.__main__"}
    assert not {m for m in library if any(t.startswith("scope.cli") for t in graph[m])}


def test_dependencies_point_down_the_package_map():
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}

    def part(module: str) -> str:
        return module.split(".")[1] if "." in module else "scope"

    assert {part(m) for m in MODULES} == set(layer), "docs/architecture.md and LAYERS name every part of scope/"
    upward = sorted(f"{m} -> {t}" for m, targets in import_graph().items() for t in targets
                    if layer[part(t)] > layer[part(m)])
    assert not upward, "imports against the package map:\n" + "\n".join(upward)


def test_the_checker_sees_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_every_import_form():
    graph = import_graph()
    assert "scope.errors" in graph["scope"]  # from scope.errors import ScopeError
    assert "scope.store.reader" in graph["scope.store"]  # from scope.store.reader import ...
    assert "scope.store.capture" in graph["scope.store"]  # lazy, inside __getattr__
    tree = ast.parse("from . import reader\nfrom .fs import StoreFS\nimport scope.models\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import scope.data\n")
    found = {t for node in _imports(tree) for t in _targets("scope.store.capture", node)}
    assert found == {"scope.store.reader", "scope.store.fs", "scope.models"}

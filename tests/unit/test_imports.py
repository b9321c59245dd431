"""The library's layering: no import cycle anywhere in pipeline/, and the library never imports
the reference implementation (reference/), which only tests and benchmarks use.

Every import a module can run counts, those inside functions too (a lazy import that closes a
cycle still makes a cycle); imports under `if TYPE_CHECKING:` are annotations only and don't."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_imports(tree: ast.AST):
    """Import nodes outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """module -> the pipeline modules (and top-level packages) it imports."""
    modules = _modules()

    def owner(name: str) -> str:  # the module a dotted name lives in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] == "pipeline":
                    target = owner(target)
                    if target and target != name:
                        edges.add(target)
                else:
                    edges.add(target.split(".")[0])
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_pipeline_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "pipeline.federated.engine.shard" in graph["pipeline.federated.runtime.server"] | \
        graph["pipeline.federated.runtime.pool"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    tree = ast.parse("def f():\n    from pipeline.b import x\n")
    assert [type(n).__name__ for n in _runtime_imports(tree)] == ["ImportFrom"]
    guarded = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.b import x\n")
    assert [n.module for n in _runtime_imports(guarded)] == ["typing"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "torch"}, "b": {"c"}, "c": set()}) is None


def test_the_library_never_imports_the_reference_implementation():
    importers = sorted(name for name, edges in import_graph().items() if "reference" in edges)
    assert importers == []
    assert (ROOT / "reference" / "oracle.py").exists() and not (ROOT / "pipeline" / "federated" / "oracle.py").exists()

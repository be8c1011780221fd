"""Each package's modules import one another without a cycle, types included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import blockstore
import nbdfront


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, package: str) -> set[str]:
    """Every name an import in ``tree`` names, under ``TYPE_CHECKING`` too, absolute."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package at ``root`` it imports (not its own parent
    packages, which importing it runs first whatever it says)."""
    paths = {module_name(root, path): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for target in imported(ast.parse(path.read_text()), package):
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
        graph[name] = targets
    return graph


def a_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the modules along it, or None."""
    done: set[str] = set()
    for start in graph:
        path: list[str] = []
        stack = [(start, iter(sorted(graph[start])))]
        on_path = {start}
        path.append(start)
        while stack:
            node, rest = stack[-1]
            step = next(rest, None)
            if step is None:
                stack.pop()
                on_path.discard(path.pop())
                done.add(node)
            elif step in on_path:
                return [*path[path.index(step) :], step]
            elif step not in done:
                stack.append((step, iter(sorted(graph[step]))))
                on_path.add(step)
                path.append(step)
    return None


@pytest.mark.parametrize("package", [nbdfront, blockstore], ids=lambda p: p.__name__)
def test_no_module_imports_one_that_imports_it(package):
    """Tried: every import of every module of the package, those made only for type
    checking included, as a graph.
    Must hold: no cycle. Before, the session imported the server for its type under
    ``TYPE_CHECKING`` while the server imported the session (the session now names what
    it needs of its server as a Protocol, ``Host``), and the cache's records of
    references imported the environment for its type while the environment imported
    them (they now name what they need of it, ``Databases``)."""
    graph = import_graph(Path(package.__file__).parent)
    assert a_cycle(graph) is None, a_cycle(graph)

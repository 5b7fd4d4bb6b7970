"""Dependencies point one way: no import cycles, and the serving loop stays below
the HTTP server and the registry.

The import graph is read from the source with ``ast`` (nothing is imported):
an edge runs from a module to each distilld module it imports, at module level
or, for the second check, anywhere (a function-level import only defers a
cycle). Imports under ``if TYPE_CHECKING:`` are left out: they never run. A
module's own package ``__init__`` is no edge (Python runs it first anyway), but
an explicit import of a package is.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = REPO / "daemon"
BENCH = REPO / "bench"


def _module_names(root: Path, package: str | None) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under ``root``."""
    base = root / package if package else root
    names: dict[str, Path] = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(path: Path, module: str, *, module_level_only: bool) -> set[str]:
    """Every dotted name an import statement of ``path`` may load (for ``from a
    import b``: ``a`` and ``a.b``, since ``b`` may be a submodule)."""
    names: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            nested = in_function or isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            if not (module_level_only and nested):
                if isinstance(child, ast.Import):
                    names.update(alias.name for alias in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = module.split(".") if is_package else module.split(".")[:-1]
                        parts = parts[: len(parts) - (child.level - 1)]
                        base = ".".join([*parts, base] if base else parts)
                    names.add(base)
                    names.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return names


def _graph(modules: dict[str, Path], *, module_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for name in _imported_names(path, module, module_level_only=module_level_only):
            while name and name not in modules:  # `from a import f`: f is no module
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _describe(cycles: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for component in cycles:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append(f"{component}: {'; '.join(edges)}")
    return "\n".join(lines)


@pytest.mark.parametrize("module_level_only", [True, False], ids=["module-level", "anywhere"])
def test_no_import_cycle_between_distilld_modules(module_level_only: bool) -> None:
    modules = _module_names(PACKAGE_ROOT, "distilld")
    graph = _graph(modules, module_level_only=module_level_only)
    cycles = _cycles(graph)
    assert not cycles, (
        "distilld modules import each other in a cycle; move what both need into a "
        "module below them (e.g. distilld/vocabulary.py):\n" + _describe(cycles, graph)
    )


def test_no_import_cycle_between_benchmarks() -> None:
    # The benchmarks import each other by file name (bench/ is their sys.path[0]).
    modules = _module_names(BENCH, None)
    graph = _graph(modules, module_level_only=False)
    cycles = _cycles(graph)
    assert not cycles, "bench scripts import each other in a cycle:\n" + _describe(cycles, graph)


def test_the_graph_sees_a_cycle(tmp_path: Path) -> None:
    # The checks above pass on an empty graph too: make sure a cycle is found.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import g\n")
    (package / "b.py").write_text("def g():\n    from pkg import a\n")
    modules = _module_names(tmp_path, "pkg")
    assert _cycles(_graph(modules, module_level_only=True)) == []
    assert _cycles(_graph(modules, module_level_only=False)) == [["pkg.a", "pkg.b"]]


def test_monitoring_sits_below_the_policy_model() -> None:
    # policy/model.py assembles the policy from sections, monitoring's among them, so
    # monitoring may use the sections' shared building blocks (policy/common.py) and
    # nothing else of the policy package (the verdicts once lived in policy/ and
    # monitoring/measure.py imported them back: policy <-> monitoring).
    modules = _module_names(PACKAGE_ROOT, "distilld")
    graph = _graph(modules, module_level_only=False)
    allowed = {"distilld.policy", "distilld.policy.common"}
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("distilld.monitoring")
        for target in targets
        if target.startswith("distilld.policy") and target not in allowed
    )
    assert not upward, upward


SERVING_LOOP = "distilld.traffic.loop"
ABOVE_THE_LOOP = ("distilld.ops.http", "distilld.ops.server", "distilld.registry")


def test_the_serving_loop_imports_neither_the_http_server_nor_the_registry() -> None:
    modules = _module_names(PACKAGE_ROOT, "distilld")
    direct = _graph(modules, module_level_only=False)[SERVING_LOOP]
    above = sorted(m for m in direct if m.startswith(ABOVE_THE_LOOP))
    assert not above, above
    # Nor through the modules it imports: load it alone and look.
    code = (
        f"import sys; import {SERVING_LOOP}; "
        f"print(','.join(m for m in {ABOVE_THE_LOOP!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing {SERVING_LOOP} loads {result.stdout.strip()}"

"""The package's import graph: no cycles (imports inside functions included), and shared input/output below its
users (`training/` and `data/` never import `tools/`; `fileio/` imports none of the three)."""

import ast
from pathlib import Path

import pytest

import modeling_safe_llava


PACKAGE_DIR = Path(modeling_safe_llava.__file__).parent
PACKAGE = "modeling_safe_llava"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by a `from ... import` statement inside `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """`{module: the package modules it imports}`, every `import` statement anywhere in the file (functions too)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node)
                # `from pkg import submodule` imports the submodule; `from module import name` the module.
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
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
            visit(node)
    return found


def test_the_graph_sees_function_level_imports():
    # tiny.py imports the model class inside a function: the graph must see it, or cycles through such imports hide.
    assert f"{PACKAGE}.modeling_safe_llava" in import_graph()[f"{PACKAGE}.tiny"]


def test_the_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


@pytest.mark.parametrize(
    "lower, upper",
    [("training", "tools"), ("data", "tools"), ("fileio", "tools"), ("fileio", "training"), ("fileio", "data")],
)
def test_lower_floors_import_nothing_from_upper_floors(lower, upper):
    upward = {
        (module, target)
        for module, targets in import_graph().items()
        if module.startswith(f"{PACKAGE}.{lower}")
        for target in targets
        if target.startswith(f"{PACKAGE}.{upper}")
    }
    assert upward == set()

"""The shape of the package: import graph without cycles, layers that only import downwards,
short modules in the segmentation stack and short functions everywhere outside the kernels.

These are read from the source (``ast``), not from an import, so a deferred import
inside a function counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vfm_adapters

PACKAGE_ROOT = Path(vfm_adapters.__file__).parent
#: Modules of the segmentation and adaptation stack stay about this long at most.
MAX_MODULE_LINES = 420
#: Function bodies (docstring excluded) stay about this long at most, kernels excepted.
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    return {id(node) for block in ast.walk(tree) if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)}


def _imported_modules(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules an import statement loads (``from . import x`` names module ``x``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    if node.level:
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = {f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names}
    return found & set(MODULES)


def import_graph(deferred: bool) -> dict[str, set[str]]:
    """``{module: modules it imports}``; ``deferred`` adds the imports inside functions."""
    graph = {}
    for module, tree in TREES.items():
        skip = _type_checking_nodes(tree)
        nodes = ast.walk(tree) if deferred else iter(tree.body)
        graph[module] = {target for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip
                         for target in _imported_modules(module, node)} - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_module_level_imports_have_no_cycle():
    assert find_cycle(import_graph(deferred=False)) is None


#: Deferred imports allowed to point up a layer, each with its reason. Keep this short.
UPWARD_HOOKS = {
    # Injecting into a transformers model routes its save_pretrained through
    # vfm_adapters.hub, so a user's save_pretrained never drops the adapters.
    ("vfm_adapters.methods.base", "vfm_adapters.hub"),
}


def test_the_whole_package_has_no_cycle_but_the_listed_hooks():
    graph = import_graph(deferred=True)
    for source, target in UPWARD_HOOKS:
        assert target in graph[source], f"{source} -> {target} is listed but gone: remove it from UPWARD_HOOKS"
        graph[source] = graph[source] - {target}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("layer", ["vfm_adapters.seg", "vfm_adapters.adaptation", "vfm_adapters.methods",
                                   "vfm_adapters.hosts", "vfm_adapters.kernels"])
def test_no_package_has_a_cycle_even_through_deferred_imports(layer):
    graph = import_graph(deferred=True)
    inside = {m: {t for t in targets if t.startswith(layer)} for m, targets in graph.items() if m.startswith(layer)}
    for package_init in (layer,):  # a package's __init__ re-exports its modules: that is not a dependency cycle
        inside.pop(package_init, None)
    assert find_cycle(inside) is None


@pytest.mark.parametrize("lower, upper", [
    ("vfm_adapters.methods", "vfm_adapters.seg"), ("vfm_adapters.hosts", "vfm_adapters.seg"),
    ("vfm_adapters.kernels", "vfm_adapters.seg"), ("vfm_adapters.methods", "vfm_adapters.adaptation"),
    ("vfm_adapters.hosts", "vfm_adapters.adaptation"), ("vfm_adapters.seg", "vfm_adapters.adaptation"),
    ("vfm_adapters.seg", "vfm_adapters.commands"), ("vfm_adapters.adaptation", "vfm_adapters.commands"),
    ("vfm_adapters.methods", "vfm_adapters.commands"),
])
def test_layers_import_only_downwards(lower, upper):
    graph = import_graph(deferred=True)
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items()
                    if m.startswith(lower) and not m.endswith(".__main__")  # an entry point runs a command
                    for t in targets if t.startswith(upper))
    assert not upward, f"{lower} must not import {upper}: {upward}"


STACK = ("vfm_adapters.seg", "vfm_adapters.adaptation", "vfm_adapters.commands")
ENTRY_POINTS = ("vfm_adapters", "vfm_adapters.cli", "vfm_adapters.__main__")


def test_the_core_never_imports_the_segmentation_stack_or_the_cli():
    graph = import_graph(deferred=True)
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if not m.startswith(STACK) and m not in ENTRY_POINTS
                    for t in targets if t.startswith(STACK))
    assert not upward, upward


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(("vfm_adapters.seg", "vfm_adapters.adaptation"))])
def test_segmentation_modules_are_short(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[module]} has {lines} lines (split it by job)"


def function_lengths(tree: ast.Module) -> dict[str, int]:
    """``{qualified-ish name: body lines without the docstring}`` of every function in ``tree``."""
    lengths = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
            doc = first.end_lineno - first.lineno + 1 if has_doc else 0
            lengths[f"{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1 - doc
    return lengths


def test_function_lengths_counts_the_body_without_the_docstring():
    tree = ast.parse('def f():\n    """Doc\n    more."""\n    a = 1\n    return a\n')
    assert function_lengths(tree) == {"f:1": 3}


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith("vfm_adapters.kernels")])
def test_functions_are_short(module):
    long = {name: n for name, n in function_lengths(TREES[module]).items() if n > MAX_FUNCTION_LINES}
    assert not long, f"{MODULES[module]}: functions over {MAX_FUNCTION_LINES} lines: {long}"

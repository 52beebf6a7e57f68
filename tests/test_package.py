"""The package's shape: module-level imports only, and no import cycle among its modules.

Read from the source with `ast` (nothing is imported): a module's own-package imports are its
edges; `from fmlm_jax import x` is an edge to `fmlm_jax.x` when that is a module. A package's
__init__ may import its own submodules (that is not a cycle); a submodule that imports its
package back, or two modules importing each other, is.
"""

import ast
import os

from conftest import ROOT

PACKAGE = "fmlm_jax"


def _modules() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[module] = path
    return found


MODULES = _modules()


def _targets(node: ast.AST) -> list[str]:
    """The package's modules an import statement names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE and not node.level:
        names = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return names or [node.module]
    return []


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules it imports at module level}, [function-level imports])."""
    edges, inner = {m: set() for m in MODULES}, []
    for module, path in MODULES.items():
        tree = ast.parse(open(path).read())
        for node in tree.body:
            for stmt in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
                edges[module].update(t for t in _targets(stmt) if t != module)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{module}.{fn.name} imports {t}" for stmt in ast.walk(fn) for t in _targets(stmt)]
    return edges, inner


def test_no_function_level_imports_of_the_package():
    _, inner = _graph()
    assert inner == [], inner


def test_no_import_cycles():
    edges, _ = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif state.get(target) is None:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == [], cycles


def test_the_graph_is_read():
    # The checks above have something to check: the loop imports the layers below it.
    edges, _ = _graph()
    assert {"fmlm_jax.checkpoints", "fmlm_jax.sharding", "fmlm_jax.objectives"} <= edges["fmlm_jax.train"]
    assert "fmlm_jax.train" not in edges["fmlm_jax.sharding"]
    assert edges["fmlm_jax.config"] == set()  # the schema is at the bottom

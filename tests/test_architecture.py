"""The structure docs/architecture.md draws, held against the source: no import cycle among the modules of
``mixers`` and ``models``, and the registry's rooms import no op or backend.

The import graph is read from the source (``ast``), every ``import`` counted wherever it is (inside functions
too), except those under ``if TYPE_CHECKING:`` (annotations only, never run). ``from pkg import name`` counts as
an import of ``pkg.name`` when that is a module, else of ``pkg``. A package's ``__init__`` is not counted as
imported by its submodules (Python runs it first either way, and ours import nothing heavy).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mixers", "models")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports at run time."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, *([base] if base else [])])
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    own = {m for m in found if m in known and m != module}
    return {m for m in own if not module.startswith(m + ".")}  # a package's __init__ runs first anyway


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
        for name, path in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_reader_finds_a_cycle_and_ignores_type_checking_imports():
    """The test below can fail: a cycle, one of its imports inside a function, is found; TYPE_CHECKING is not."""
    known = {"p", "p.a", "p.b", "p.c"}
    a = ast.parse("def f():\n    from p import b\n")
    b = ast.parse("from p.a import f\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import c\n")
    c = ast.parse("import p.b\n")
    graph = {
        "p.a": _imports(a, "p.a", False, known),
        "p.b": _imports(b, "p.b", False, known),
        "p.c": _imports(c, "p.c", False, known),
    }
    assert graph == {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.b"}}
    assert cycles(graph) == [["p.a", "p.b"]]


def test_mixers_and_models_have_no_import_cycle():
    graph = import_graph()
    assert {"mixers.ops.base", "models.lm", "mixers.registry"} <= set(graph)
    found = cycles(graph)
    assert not found, "import cycles (each a set of modules that import one another): " + "; ".join(
        " <-> ".join(c) for c in found
    )


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_the_registry_holds_data_and_imports_no_op_or_backend():
    graph = import_graph()
    for room in ("mixers.registry", "mixers.catalogue", "mixers.plugins", "mixers.selection"):
        reached = _reach(graph, room)
        bad = sorted(m for m in reached if m.startswith(("mixers.ops", "mixers.backends")))
        assert not bad, f"{room} imports {bad}"


def test_mixers_never_imports_models():
    graph = import_graph()
    bad = {
        m: sorted(i for i in imports if i.startswith("models"))
        for m, imports in graph.items()
        if m.startswith("mixers")
    }
    assert not any(bad.values()), {m: i for m, i in bad.items() if i}

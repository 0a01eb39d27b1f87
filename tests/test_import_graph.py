"""No module-level import cycle inside the package.

Every module is parsed with ``ast`` (nothing is imported). An edge A -> B means that executing A's module body
imports B: ``import x.y`` and ``from x import y`` at module level (also inside top-level ``if`` / ``try`` and
class bodies; not inside functions, not under ``if TYPE_CHECKING:`` or ``if __name__ == "__main__":``). ``from pkg import name`` goes to the
submodule ``pkg.name`` when there is one, else to ``pkg`` (its ``__init__``). As in Python, importing
``a.b.c`` first runs the ``__init__`` of every package on the way (``a``, ``a.b``), except the packages A is
itself inside, which are already being imported when A runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "sae_lens_multimodal"
ROOT = "sae_lens_multimodal"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_main_guard(test: ast.expr) -> bool:
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _module_level_imports(body: list[ast.stmt]) -> list[ast.stmt]:
    """Import statements that run when the module body runs (on import, not as a script)."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if _is_main_guard(node.test):
                continue
            if not _is_type_checking(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                found += _module_level_imports(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            found += _module_level_imports(node.body)
        elif isinstance(node, ast.ClassDef):
            found += _module_level_imports(node.body)
    return found


def _targets(module: str, node: ast.stmt) -> set[str]:
    """The package modules one import statement in ``module`` names (before adding package chains)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        out = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: resolve against the importing module's package
            base = module.split(".") if _is_package(module) else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            out.add(sub if sub in MODULES else source)
    return {t for t in out if t == ROOT or t.startswith(ROOT + ".")}


def _with_package_chain(importer: str, target: str) -> set[str]:
    """``target`` plus the packages Python runs on the way to it, minus those the importer is inside."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    own = importer.split(".")
    inside = {".".join(own[:i]) for i in range(1, len(own))} | ({importer} if _is_package(importer) else set())
    return {m for m in chain if m in MODULES and m not in inside and m != importer}


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in _module_level_imports(tree.body):
            for target in _targets(module, node):
                edges |= _with_package_chain(module, target)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan, iterative enough for this package's depth
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(comp) > 1 or v in graph.get(v, ()):
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_one_cycle(graph, sorted(c)) for c in components]


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete path start -> ... -> start inside a strongly connected component (for the message)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_the_checker_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_script_guards_and_type_checking_blocks_are_not_module_level():
    tree = ast.parse(
        "import os\n"
        "if TYPE_CHECKING:\n    import sae_lens_multimodal.a\n"
        "if __name__ == '__main__':\n    import sae_lens_multimodal.b\n"
        "try:\n    import sae_lens_multimodal.c\nexcept ImportError:\n    pass\n"
    )
    names = [a.name for node in _module_level_imports(tree.body) for a in node.names]
    assert names == ["os", "sae_lens_multimodal.c"]


def test_from_package_import_submodule_resolves_to_the_submodule_and_runs_the_chain():
    node = ast.parse("from sae_lens_multimodal.steering import core").body[0]
    assert _targets("sae_lens_multimodal.analysis.labels", node) == {"sae_lens_multimodal.steering.core"}
    assert _with_package_chain("sae_lens_multimodal.analysis.labels", "sae_lens_multimodal.steering.core") == {
        "sae_lens_multimodal.steering",
        "sae_lens_multimodal.steering.core",
    }


def test_no_module_level_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "module-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)

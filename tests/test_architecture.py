"""The house rules, checked on the source: every module imports, the import graph (function-local imports
included) has no cycle, arrows go flows -> tasks -> models -> kernels with storage a leaf, and models and
kernels never import Prefect."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("flows", "tasks", "models", "kernels", "storage")
#: what each top-level package may import from the others (DESIGN.md "Where things live")
ALLOWED = {
    "flows": {"flows", "tasks", "models", "storage"},
    "tasks": {"tasks", "models", "kernels", "storage"},
    "models": {"models", "kernels", "storage"},
    "kernels": {"kernels"},
    "storage": {"storage"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, int]]:
    """(project module imported, line) for every import statement of a module, function-local ones included."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != name:
                found.append((t, node.lineno))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_graph_reads_the_imports_it_should():
    # an independent spot check of the parser: edges written out by hand from the sources
    assert any(t == "tasks.run.registry" for t, _ in GRAPH["tasks.stages.verify"])
    assert any(t == "tasks.stages.tag.rtagger" for t, _ in GRAPH["tasks.stages.tag"])  # function-local
    assert any(t == "storage.schemas" for t, _ in GRAPH["storage.layout"])
    assert not any(t.startswith("tasks") for t, _ in GRAPH["models.matcher"])


@pytest.mark.parametrize(
    "name", sorted(m for m in MODULES if not m.endswith("__main__"))
)  # scripts run on import
def test_every_module_imports(name):
    importlib.import_module(name)


def test_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t, _ in GRAPH[m]:
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_arrows_point_one_way():
    wrong = [
        f"{m}:{line} imports {t}"
        for m, edges in GRAPH.items()
        for t, line in edges
        if t.split(".")[0] not in ALLOWED[m.split(".")[0]]
    ]
    assert wrong == []


def test_models_and_kernels_never_import_prefect():
    wrong = []
    for name, path in MODULES.items():
        if name.split(".")[0] not in ("models", "kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            wrong += [f"{name}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] == "prefect"]
    assert wrong == []


def test_a_cycle_is_found_when_there_is_one():
    # the cycle check itself, on a graph with a known cycle (a -> b -> c -> a)
    global GRAPH
    saved = GRAPH
    GRAPH = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    try:
        with pytest.raises(AssertionError, match="a -> b -> c -> a"):
            test_import_graph_has_no_cycle()
    finally:
        GRAPH = saved


def test_the_run_engine_knows_no_stage():
    # tasks/run (context, registry, execution, leases, schedule) is below the stages: they register with it
    wrong = [
        f"{m}:{line} imports {t}"
        for m, edges in GRAPH.items()
        if m.startswith("tasks.run")
        for t, line in edges
        if t.startswith(("tasks.stages", "tasks.audit"))
    ]
    assert wrong == []

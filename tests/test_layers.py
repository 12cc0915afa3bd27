"""The layout stays true: every import points down the declared layer order, and no module
imports itself back through others.  Read from the source with `ast`, lazy imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first.  A module may import its own layer and the layers below; the packages sharing a
# layer (the two sides of a round) may not import each other.  docs/architecture.md describes them.
LAYERS: list[tuple[str, ...]] = [
    ("testbed.core",),
    ("testbed.data",),
    ("testbed.model",),
    ("testbed.measure",),
    ("testbed.comm",),
    ("testbed.agent", "testbed.server"),
    ("testbed.experiments",),
    ("launch",),
    ("testbed.cli",),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str) -> str | None:
    """The entry of LAYERS a module belongs to (the longest matching prefix)."""
    found = [p for layer in LAYERS for p in layer if name == p or name.startswith(p + ".")]
    return max(found, key=len) if found else None


def rank(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for top in ("testbed", "launch") for p in (root / top).rglob("*.py")}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from package import module` counts as the module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{path}: relative import; the project imports by absolute names"
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known)
    return out


def graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {m: imports(p, m, set(modules)) - {m} for m, p in modules.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    problems = []
    for m, targets in sorted(g.items()):
        mine = package_of(m)
        if mine is None:
            if m not in ("testbed", "launch"):
                problems.append(f"{m}: in no layer (add its package to LAYERS)")
            continue
        for t in sorted(targets):
            theirs = package_of(t)
            if theirs is None or theirs == mine:
                continue
            if rank(theirs) > rank(mine):
                problems.append(f"{m} imports {t}: {theirs} sits above {mine}")
            elif rank(theirs) == rank(mine):
                problems.append(f"{m} imports {t}: {theirs} and {mine} are peers")
    return problems


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down():
    assert upward(graph(ROOT)) == []


def test_no_import_cycles():
    assert cycles(graph(ROOT)) == []


def test_a_planted_upward_import_and_cycle_are_caught(tmp_path):
    for rel, text in {"testbed/__init__.py": "", "testbed/core/__init__.py": "",
                      "testbed/core/plan.py": "from testbed.server.loop import RoundLoop\n",
                      "testbed/server/__init__.py": "", "testbed/server/loop.py": "from testbed.core import plan\n",
                      "launch/__init__.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = graph(tmp_path)
    assert upward(g) == ["testbed.core.plan imports testbed.server.loop: testbed.server sits above testbed.core"]
    assert cycles(g) == [["testbed.core.plan", "testbed.server.loop"]]


@pytest.mark.parametrize("folder, forbidden", [("tests", "tests"), ("bench", "tests")])
def test_tests_and_benchmarks_import_no_test_module(folder, forbidden):
    """Shared test code lives in tests/helpers.py and conftest.py; bench/ stands on its own."""
    allowed = {"tests.helpers"} if folder == "tests" else set()
    bad = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names
                    if (n == forbidden or n.startswith(forbidden + ".")) and n not in allowed]
    assert bad == []

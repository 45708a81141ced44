"""The layering of docs/architecture.md, enforced: no import from a lower layer to a higher one, no import
cycle (function-level imports included), no function over 80 lines, no switch on a method, model or class
name outside the registries. Each check is also run on a small planted violation, so a checker that
silently sees nothing fails too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qcnn"

#: layer of each top-level part of the package, bottom (0) to top; a module may import its own layer
#: (without a cycle) and any lower one
LAYERS: dict[str, int] = {
    "qcnn.io": 0,
    "qcnn.quant": 1,
    "qcnn.calib": 1,
    "qcnn.recipes": 2,
    "qcnn.nn": 3,
    "qcnn.transform": 4,
    "qcnn.data": 5,
    "qcnn.models": 5,
    "qcnn.report": 5,
    "qcnn.detection": 5,
    "qcnn.train": 6,
    "qcnn.methods": 7,
    "qcnn.checkpoint": 8,
    "qcnn.integer": 8,
    "qcnn.compress": 8,
    "qcnn.bench": 9,
    "qcnn.commands": 10,
    "qcnn.cli": 10,
    "qcnn.__main__": 10,
    "qcnn": 10,
}
MAX_LINES = 80
SWITCH = re.compile(r"""\.method\s*==\s*['"]|__name__\s*(==|!=|in)\s""")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (function-level imports included);
    an import of a module's own parent package (its registry) is not an edge: the package imports it."""
    mods = {module_name(p, root): p for p in root.rglob("*.py")}
    pkg = root.name
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] == pkg:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == pkg)
        graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + ".")}
    return graph


def layer_of(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def long_functions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return out


def name_switches(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if "registry" in path.name:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if SWITCH.search(line.split("#")[0]) and "__name__ == \"__main__\"" not in line:
                out.append(f"{path.relative_to(root.parent)}:{i} {line.strip()}")
    return out


def test_every_module_has_a_layer():
    graph = import_graph(ROOT)
    for m in graph:
        layer_of(m)  # raises ValueError (max of nothing) for a module outside LAYERS


def test_no_upward_import():
    assert upward_imports(import_graph(ROOT)) == []


def test_no_import_cycle():
    assert cycles(import_graph(ROOT)) == []


def test_no_function_over_80_lines():
    assert long_functions(ROOT) == []


def test_no_switch_on_names():
    assert name_switches(ROOT) == []


@pytest.fixture
def planted(tmp_path):
    """A tiny package with one of each violation."""
    pkg = tmp_path / "qcnn"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "methods").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("from qcnn.methods import a\n")  # package -> submodule: fine
    (pkg / "quant" / "x.py").write_text("def f():\n    from qcnn.methods import a\n    return a\n")  # upward
    body = "\n".join(f"    y = {i}" for i in range(MAX_LINES))
    (pkg / "methods" / "a.py").write_text(
        "import qcnn.methods.b\nfrom qcnn.methods import register\n"  # parent-package edge is ignored
        f"def long():\n{body}\n    return y\n"
        "def g(recipe, m):\n    return recipe.method == 'pact' or type(m).__name__ == 'ResNet'\n")
    (pkg / "methods" / "b.py").write_text("def h():\n    import qcnn.methods.a\n")  # cycle a <-> b
    return pkg


def test_checks_see_planted_violations(planted):
    graph = import_graph(planted)
    assert "qcnn.methods" not in graph["qcnn.methods.a"]
    assert upward_imports(graph) == ["qcnn.quant.x -> qcnn.methods", "qcnn.quant.x -> qcnn.methods.a"]
    assert cycles(graph) == [["qcnn.methods.a", "qcnn.methods.b"]]
    assert [s.split()[1] for s in long_functions(planted)] == ["long"]
    assert len(name_switches(planted)) == 1 and "recipe.method" in name_switches(planted)[0]

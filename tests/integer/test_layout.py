"""Static checks of the layout of ``qcnn.integer`` (docs/integer.md, section "Module layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import qcnn.integer

PKG = Path(qcnn.integer.__file__).parent
MAX_FUNCTION_LINES = 80


def _trees() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def _qcnn_imports(nodes) -> set[str]:
    """qcnn modules named by the import statements among ``nodes`` (``from qcnn.integer import x`` -> both)."""
    out = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("qcnn")}
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("qcnn"):
            out.add(n.module)
            out |= {f"{n.module}.{a.name}" for a in n.names}
    return out


def test_no_function_level_imports_of_qcnn_modules():
    for name, tree in _trees().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert not _qcnn_imports(ast.walk(fn)), f"{name}.{fn.name} imports a qcnn module"


def test_functions_are_short():
    for name, tree in _trees().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = fn.end_lineno - fn.lineno + 1
                assert n <= MAX_FUNCTION_LINES, f"{name}.{fn.name}: {n} lines"


def _package_graph() -> dict[str, set[str]]:
    trees = _trees()
    graph = {}
    for name, tree in trees.items():
        deps = {m.rsplit(".", 1)[-1] for m in _qcnn_imports(tree.body) if m.startswith("qcnn.integer.")}
        graph[name] = {d for d in deps if d in trees and d != name}
    return graph


def test_package_import_graph_is_acyclic():
    graph = _package_graph()
    state: dict[str, int] = {}

    def visit(m, path):
        assert state.get(m) != 1, f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_onnx_forms_share_the_builder_and_do_not_import_each_other():
    g = _package_graph()
    assert "onnx_builder" in g["onnx_qdq"] and "onnx_builder" in g["onnx_integer"]
    assert not g["onnx_integer"] & {"onnx_qdq", "onnx_qlinear", "onnx_export"}
    assert not g["onnx_qdq"] & {"onnx_integer", "onnx_qlinear", "onnx_export"}
    assert not g["onnx_builder"] & {"onnx_qdq", "onnx_qlinear", "onnx_integer", "onnx_export"}


def test_no_switch_on_class_names():
    for name, tree in _trees().items():
        for n in ast.walk(tree):
            if isinstance(n, ast.Compare):
                sides = [n.left, *n.comparators]
                assert not any(isinstance(s, ast.Attribute) and s.attr == "__name__" for s in sides), \
                    f"{name}: line {n.lineno} compares a __name__"

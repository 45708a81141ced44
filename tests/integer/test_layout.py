"""Static checks of the layout of ``qcnn.integer`` (docs/integer.md, section "Module layout") beyond the
package-wide ones of tests/test_architecture.py (no cycle, no function over 80 lines, no name switch)."""

from __future__ import annotations

import ast

from tests.test_architecture import ROOT, import_graph

PKG = ROOT / "integer"


def test_no_function_level_imports_of_qcnn_modules():
    for path in sorted(PKG.glob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(fn):
                names = ([a.name for a in n.names] if isinstance(n, ast.Import)
                         else [n.module or ""] if isinstance(n, ast.ImportFrom) else [])
                assert not any(m.startswith("qcnn") for m in names), f"{path.stem}.{fn.name} imports {names}"


def test_onnx_forms_share_the_builder_and_do_not_import_each_other():
    graph = import_graph(ROOT)

    def deps(mod: str) -> set[str]:
        return {d.rsplit(".", 1)[-1] for d in graph[f"qcnn.integer.{mod}"] if d.startswith("qcnn.integer.")}

    assert "onnx_builder" in deps("onnx_qdq") and "onnx_builder" in deps("onnx_integer")
    assert not deps("onnx_integer") & {"onnx_qdq", "onnx_qlinear", "onnx_export"}
    assert not deps("onnx_qdq") & {"onnx_integer", "onnx_qlinear", "onnx_export"}
    assert not deps("onnx_builder") & {"onnx_qdq", "onnx_qlinear", "onnx_integer", "onnx_export"}

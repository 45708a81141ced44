"""benchmarks/any_cnn.py on its hand-written rows: every column computed on real CIFAR-10 images and read back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("any_cnn", REPO / "benchmarks" / "any_cnn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_functional_row_is_green_in_every_column(bench, cifar_zip, monkeypatch):
    monkeypatch.setenv("QCNN_PROGRESS", "0")
    row = bench.run_row("hand: relu/cat/view/add", str(cifar_zip), freeze_bn=True)
    assert row["ptq_cos"] > 0.999 and row["ptq_top1_agree"] >= 0.9
    onnx = row["onnx"]
    assert onnx["ok"] and onnx["max_diff_lsb"] <= 1 and onnx["dynamic"] == "spatial" and onnx["top1_equal"] == 32
    assert onnx["fq32_vs_sim64_out_lsb"] < 1 and bench.onnx_verdict(row) == "ok: integer form exact"
    assert row["engine"] == {"ok": True, "points": row["engine"]["points"], "equal": 1.0, "max_diff": 0}
    assert row["int_onnx"]["ok"] and row["save_load"]["ok"]
    for key in ("qat_float", "qat_pact", "qat_lsq", "qat_pact_freeze_bn", "qat_lsq_freeze_bn"):
        r = row[key]
        assert len(r["losses"]) == 20 and r["ok"] and r["last5"] < 0.5 * r["first5"], (key, r)
    md = bench.markdown([row], {"date": "d", "machine": "m", "torch": "t", "command": "c"})
    assert "| hand: relu/cat/view/add | 3x32x32 |" in md and "exact (" in md and "FAIL" not in md


def test_engine_refusal_is_a_named_cell_and_the_lsb_bound_reads_the_last_layer(bench, cifar_zip, monkeypatch):
    monkeypatch.setenv("QCNN_PROGRESS", "0")
    row = bench.run_row("hand: ConvTranspose2d decoder", str(cifar_zip), freeze_bn=False)
    assert row["engine"]["refused"] and "'dec.0' (QConvTranspose2d)" in row["engine"]["why"]
    assert row["onnx"]["max_diff_lsb"] <= 1 and row["save_load"]["ok"] and row["ptq_cos"] > 0.999
    assert bench.onnx_verdict(row) == "ok: QDQ form"  # no integer form: the QDQ form stands for the row
    md = bench.markdown([row], {"date": "d", "machine": "m", "torch": "t", "command": "c"})
    assert "refused: ValueError: module 'dec.0' (QConvTranspose2d)" in md
    q = bench.quantize(bench.DecoderNet().eval(), bench.Recipe(method="uniform", fold_bn=True)).eval()
    bench.calibrate(q, [torch.randn(8, 3, 32, 32)])
    w = q.fc.quantized_weight().detach().abs().sum(1).max()
    assert bench.lsb_bound(q) == pytest.approx(float(q.fc.input_quant.grid().scale) * float(w))

"""`qcnn report` on a real quantized LeNet-5: per-layer bits, SQNR, sizes and histogram files."""

import json

import torch

from qcnn import Recipe
from qcnn.checkpoint import save_model
from qcnn.cli import main
from qcnn.data import get_data
from qcnn.methods import quantize_and_calibrate
from qcnn.models import build_model


def test_report_command(tmp_path, fashion_dir):
    torch.manual_seed(0)
    bundle = get_data("fashion-mnist", train_limit=1024)
    model = build_model("lenet5", num_classes=10, in_channels=1)
    recipe = Recipe(w_bits=4, a_bits=4, first_last="8bit", calib_images=256)
    q = quantize_and_calibrate(model, recipe, bundle)
    save_model(tmp_path / "model.pt", q, {"name": "lenet5", "num_classes": 10, "in_channels": 1}, recipe=recipe)
    assert main(["report", str(tmp_path), "--dataset", "fashion-mnist", "--images", "128"]) == 0
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    bits = {r["name"]: (r["w_bits"], r["a_bits"]) for r in rep["layers"]}
    assert bits["conv1"] == (8, 8) and bits["fc3"] == (8, 8) and bits["conv2"] == (4, 4)
    rows = {r["name"]: r for r in rep["layers"]}
    # 8-bit weights: ~6 dB per bit; 4-bit clearly worse
    assert rows["fc3"]["w_sqnr_db"] > 35 and 10 < rows["conv2"]["w_sqnr_db"] < 30
    nb = q.conv2.bias.numel() if q.conv2.bias is not None else 0
    assert rows["conv2"]["packed_bytes"] == q.conv2.weight.numel() * 4 / 8 + 4 * nb
    assert rows["conv2"]["bops"] == rows["conv2"]["macs"] * 4 * 4 > 0
    assert rep["totals"]["compression"] > 4
    for layer in bits:
        assert (tmp_path / "report" / f"hist_{layer}.png").stat().st_size > 1000

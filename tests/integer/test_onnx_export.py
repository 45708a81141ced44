"""ONNX QDQ export: ONNX Runtime vs the fake-quant simulation (codes to 1 LSB), fused integer kernels, CLI."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import IntegerModel, add_residual_quantizers, run_engine, to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.onnx_export import OrtModel, optimized_op_counts, ort_codes, to_onnx
from qcnn.methods import quantize


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        x = nn.functional.relu6(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _model(residual_int8=False):
    torch.manual_seed(0)
    q = quantize(_Res().eval(), {"method": "uniform", "fold_bn": True, "first_last": "8bit"}).eval()
    if residual_int8:
        add_residual_quantizers(q)
    with torch.no_grad(), calibrating(q):
        q(torch.randn(64, 3, 12, 12))
    return q


def _ort_forced(q, x):
    im = to_integer(q, x)
    ref, sim = simulation_codes(q, x)
    model, names = to_onnx(im, with_codes=True, forced=True)
    ort = OrtModel(model, threads=1)
    feeds = {"input": x.numpy()}
    for i in ort.session.get_inputs():
        if i.name.startswith("force:"):
            feeds[i.name] = sim[i.name[6:]].numpy().astype(np.uint8 if "uint8" in i.type else np.int8)
    outs = ort.session.run(None, feeds)
    got = {p: torch.from_numpy(outs[ort.output_names.index(n)].astype(np.int64))
           for p, n in names.items() if n in ort.output_names}
    return im, ref, sim, got, outs[0]


def test_onnx_runtime_matches_simulation_per_layer():
    q = _model()
    x = torch.randn(16, 3, 12, 12)
    im, ref, sim, got, logits = _ort_forced(q, x)
    cmp = compare_codes(got, sim)
    assert cmp["points"] == len(sim) and cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999, cmp
    assert np.allclose(logits, ref.numpy(), atol=1e-3 * float(ref.abs().max()))
    # end to end (no forcing): ONNX Runtime and the integer engine give the same predictions
    ort = OrtModel(to_onnx(im), threads=1)
    assert (ort(x).argmax(1) == im(x).argmax(1)).float().mean() >= 0.9


def test_onnx_graph_is_qdq_and_fuses_to_integer_kernels():
    q = _model(residual_int8=True)
    im = to_integer(q, torch.randn(2, 3, 12, 12))
    m = to_onnx(im)
    assert m.opset_import[0].version >= 13
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    per_channel = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and
                   any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # per-channel weights carry axis=0
    inits = {t.name: t for t in m.graph.initializer}
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in inits.values())
    assert any(t.data_type == onnx.TensorProto.INT32 for t in inits.values())
    counts = optimized_op_counts(m, threads=1)
    # conv2 (output quantized for the add) runs as QLinearConv and the classifier as QGemm; conv1 feeds a
    # float residual branch and dw a float average pool in the simulation, so they stay DQ -> Conv
    assert counts.get("com.microsoft.QLinearConv", 0) + counts.get("QLinearConv", 0) == 1, counts
    assert counts.get("com.microsoft.QGemm", 0) == 1, counts


def test_residual_quantizers_keep_engine_exact():
    q = _model(residual_int8=True)
    x = torch.randn(8, 3, 12, 12)
    im = to_integer(q, x)
    ref, sim = simulation_codes(q, x)
    assert "conv2.out_quant" in sim
    _, forced = im.run(x, force=sim, record=True)
    cmp = compare_codes(forced, sim)
    assert cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999


def test_run_engine_and_export_command(tmp_path):
    from qcnn.checkpoint import save_model
    from qcnn.cli import main
    from qcnn.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1)
    recipe = {"method": "uniform", "first_last": "8bit", "fold_bn": True}
    q = quantize(model.eval(), recipe).eval()
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad(), calibrating(q):
        q(x)
    y = q(x).argmax(1)
    loader = [(x[:20], y[:20]), (x[20:], y[20:])]
    assert run_engine("fakequant", q, loader)["top1"] == 100.0
    assert run_engine("integer", q, loader)["top1"] >= 95.0
    assert run_engine("onnx", q, loader)["top1"] >= 95.0
    with pytest.raises(ValueError, match="unknown engine"):
        run_engine("tensorrt", q, loader)
    arch = {"name": "lenet5", "num_classes": 10, "in_channels": 1, "width": 1.0, "kwargs": {}}
    ckpt = save_model(tmp_path / "model.pt", q, arch, recipe=recipe)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "int", "--out", str(tmp_path / "lenet")]) == 0
    im = IntegerModel.load(tmp_path / "lenet.json")
    assert torch.equal(im(x), to_integer(q, x)(x))
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "l.onnx")]) == 0
    ort = OrtModel(onnx.load(str(tmp_path / "l.onnx")), threads=1)
    assert (ort(x).argmax(1) == im(x).argmax(1)).float().mean() >= 0.95
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--onnx-form", "qlinear",
                 "--out", str(tmp_path / "q.onnx")]) == 0
    qlin = onnx.load(str(tmp_path / "q.onnx"))
    assert any(n.op_type == "QLinearConv" for n in qlin.graph.node)
    ort_q = OrtModel(qlin, threads=1)
    assert (ort_q(x).argmax(1) == im(x).argmax(1)).float().mean() >= 0.95
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--onnx-form", "integer",
                 "--out", str(tmp_path / "i.onnx")]) == 0
    assert torch.equal(OrtModel(onnx.load(str(tmp_path / "i.onnx")), threads=1)(x), im(x))  # bit-exact
    assert main(["export", "--checkpoint", str(ckpt), "--format", "int", "--requant", "int32",
                 "--out", str(tmp_path / "l32")]) == 0
    assert IntegerModel.load(tmp_path / "l32.json").meta["requant"] == "int32"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--input-shape", "1,28"]) == 2


@pytest.mark.parametrize("method", ["pact", "dorefa"])
def test_pact_and_dorefa_checkpoints_export_and_run_integer_only(tmp_path, method):
    """PACT / DoReFa weights are odd integer codes on one scale (their levels (2i - n) / n): the export command
    and the integer engine take such a checkpoint and the integer ONNX form equals the engine bit for bit;
    8-bit DoReFa weights need int16 codes, which ONNX's integer kernels refuse by layer name."""
    from qcnn.checkpoint import save_model
    from qcnn.cli import main
    from qcnn.models import arch_record, build_model

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=1)
    recipe = {"method": method, "w_bits": 4, "a_bits": 4, "first_last": "same"}
    q = quantize(model.eval(), recipe).eval()
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad(), calibrating(q):
        q(x)
    ref64, sim64 = simulation_codes(q, x, dtype=torch.float64)
    im = to_integer(q, x)
    out, codes = im.run(x, record=True)
    assert compare_codes(codes, sim64)["equal"] == 1.0
    y = q(x).argmax(1)
    assert run_engine("integer", q, [(x, y)])["top1"] >= 95.0
    ckpt = save_model(tmp_path / "m.pt", q, arch_record(q), recipe=recipe)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--onnx-form", "integer",
                 "--out", str(tmp_path / "i.onnx")]) == 0
    assert torch.equal(OrtModel(onnx.load(str(tmp_path / "i.onnx")), threads=1)(x), out)
    if method == "dorefa":
        q8 = quantize(build_model("lenet5", num_classes=10, in_channels=1).eval(),
                      {**recipe, "w_bits": 8, "a_bits": 8}).eval()
        with torch.no_grad(), calibrating(q8):
            q8(x)
        im8 = to_integer(q8, x)
        assert compare_codes(im8.run(x, record=True)[1], simulation_codes(q8, x, dtype=torch.float64)[1])[
            "equal"] == 1.0
        with pytest.raises(ValueError, match="layer '.*'.*int8 weights"):
            to_onnx(im8, form="integer")


class _Down(nn.Module):
    """Stem, an identity residual block and a downsampling block with an option-A shortcut (slice + pad)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        y = torch.relu(self.bn3(self.conv3(x)))
        s = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = torch.relu(self.bn4(self.conv4(y)) + s)
        return self.fc(torch.flatten(self.pool(x), 1))


def _deploy(share=True, residual=True):
    from qcnn.integer import add_bias_quantizers, share_relu_grids

    torch.manual_seed(0)
    net = _Down().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2, net.bn3, net.bn4):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    q = quantize(net, {"method": "uniform", "fold_bn": True, "first_last": "8bit"}).eval()
    if residual:
        add_residual_quantizers(q)
    add_bias_quantizers(q)
    with torch.no_grad(), calibrating(q):
        q(torch.randn(64, 3, 12, 12))
    return share_relu_grids(q) if share else q


def test_qlinear_form_runs_channels_last_on_integer_kernels():
    q = _deploy()
    x = torch.randn(16, 3, 12, 12)
    im = to_integer(q, x)
    m = to_onnx(im, form="qlinear")
    counts = optimized_op_counts(m, threads=1)
    assert counts.get("Transpose", 0) == 1, counts  # only the network input goes NCHW -> NHWC
    assert counts.get("com.microsoft.QLinearConv") == 4 and counts.get("com.microsoft.QLinearAdd") == 2, counts
    assert counts.get("com.microsoft.QGemm") == 1 and counts.get("com.microsoft.QLinearGlobalAveragePool") == 1
    assert not any(k in counts for k in ("Conv", "Add", "DequantizeLinear", "QLinearLeakyRelu")), counts
    ref, sim = simulation_codes(q, x)
    model, names = to_onnx(im, with_codes=True, forced=True, form="qlinear")
    _, got = ort_codes(model, names, x, force=sim, threads=1)
    cmp = compare_codes(got, sim)
    assert cmp["points"] == len(sim) and cmp["elements"] > 0 and cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999, cmp
    logits = OrtModel(m, threads=1)(x)
    assert torch.allclose(logits, ref, atol=0.05 * float(ref.abs().max()))
    assert (logits.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


def test_qlinear_form_without_residual_codes_asks_for_the_qdq_form():
    q = _deploy(share=False, residual=False)
    im = to_integer(q, torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match="QDQ form"):
        to_onnx(im, form="qlinear")
    with pytest.raises(ValueError, match="form="):
        to_onnx(im, form="nhwc")
    assert to_onnx(im, form="qdq") is not None


def test_shared_relu_grids_remove_rescaling_and_keep_the_engine_exact():
    from qcnn.integer import share_relu_grids

    x = torch.randn(8, 3, 12, 12)
    before = to_integer(_deploy(share=False), x)
    q = _deploy(share=True)
    im = to_integer(q, x)
    rescale = [op for op in im.ops if op.kind == "requant" and "input_zero_point" in op.attrs]
    assert len(rescale) == 0 < len([op for op in before.ops if op.kind == "requant" and "input_zero_point" in op.attrs])
    assert q.qadd_0.out_quant is q.conv3.input_quant  # the ReLU'd sum is quantized once, on the conv's grid
    assert q.conv1.out_quant is q.conv2.input_quant
    _, sim = simulation_codes(q, x)
    _, forced = im.run(x, force=sim, record=True)
    cmp = compare_codes(forced, sim)
    assert cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999
    with pytest.raises(ValueError, match="nothing to share"):
        share_relu_grids(quantize(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), {"method": "uniform"}))

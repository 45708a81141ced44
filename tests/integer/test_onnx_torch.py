"""ONNX export through torch's exporter (qcnn.integer.onnx_torch): QDQ pairs, dynamic shapes, TensorRT rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer.onnx_runtime import OrtModel, optimized_op_counts, uint8_weights
from qcnn.integer.onnx_torch import ExportActFQ, deploy_copy, to_onnx_torch
from qcnn.methods import quantize


class _Net(nn.Module):
    """conv-BN-ReLU, a residual block, a concatenation, GELU (no integer kernel), global pool, linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(x)) + x)
        z = nn.functional.gelu(self.c3(torch.cat([x, y], 1)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


def _quantized(model, bits=8, **params):
    torch.manual_seed(0)
    q = quantize(model.eval(), {"method": "uniform", "w_bits": bits, "a_bits": bits, "first_last": "same",
                                "fold_bn": True, "params": params}).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(32, 3, 20, 20) if not isinstance(model, _Seq1d) else torch.randn(32, 2, 50))
    return q


def _lsb_bound(q) -> float:
    """One LSB of the last layer's input grid, carried through its weights (max row L1 norm)."""
    fc = q.fc if hasattr(q, "fc") else None
    s = float(fc.input_quant.grid().scale)
    return s * float(fc.quantized_weight().detach().abs().sum(1).max())


@pytest.mark.parametrize("bits", [8, 4])
def test_deploy_copy_equals_the_fake_quant_model_and_onnx_runtime_stays_within_one_lsb(bits):
    torch.manual_seed(1)
    q = _quantized(_Net(), bits)
    d = deploy_copy(q)
    x = torch.randn(6, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(d(x), q(x))  # the frozen copy is the fake-quant model, bit for bit
    mp = to_onnx_torch(q, x)
    assert {p.key: p.value for p in mp.metadata_props}["qcnn_dynamic"] == "spatial"
    ops = [n.op_type for n in mp.graph.node]
    assert ops.count("QuantizeLinear") >= 6  # activations, adds, the concatenation
    assert ops.count("DequantizeLinear") == ops.count("QuantizeLinear") + 4  # + the 4 weights, stored as codes
    assert "Gelu" in ops or "Erf" in ops  # GELU stays float between the pairs
    ort = OrtModel(mp, threads=1)
    for shape in [(6, 3, 20, 20), (3, 3, 33, 27)]:  # dynamic batch, height and width
        xx = torch.randn(*shape)
        with torch.no_grad():
            ref = q(xx)
        got = ort(xx)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) <= _lsb_bound(q) + 1e-5


def test_weights_are_int8_codes_behind_dequantize_linear():
    q = _quantized(_Net())
    mp = to_onnx_torch(q, torch.randn(2, 3, 20, 20))
    init = {i.name: numpy_helper.to_array(i) for i in mp.graph.initializer}
    dq_inputs = [n.input[0] for n in mp.graph.node if n.op_type == "DequantizeLinear"]
    int8_weights = [k for k in dq_inputs if k in init and init[k].dtype == np.int8 and init[k].ndim >= 2]
    float_weights = [k for k, v in init.items() if v.dtype == np.float32 and v.ndim == 4]
    assert len(int8_weights) == 4, (int8_weights, float_weights)  # c1, c2, c3, fc: codes stored as int8
    c1 = q.c1 if hasattr(q, "c1") else dict(q.named_modules())["c1"]
    codes = c1.weight_quant.grid().to_codes(c1.quantized_weight()).numpy()
    assert any(init[k].shape == codes.shape and np.array_equal(init[k], codes) for k in int8_weights)


def test_tensorrt_style_needs_symmetric_activations_and_names_the_quantizer():
    q = _quantized(_Net())
    with pytest.raises(ValueError, match=r"quantizer '.*'.*zero point .*TensorRT.*act_grid: symmetric"):
        to_onnx_torch(q, torch.randn(2, 3, 20, 20), style="tensorrt")
    qs = _quantized(_Net(), act_grid="symmetric")
    assert all(isinstance(m, ExportActFQ) and m.zero_point == 0 and m.cmin == -128
               for m in deploy_copy(qs, "tensorrt").modules() if isinstance(m, ExportActFQ))
    mp = to_onnx_torch(qs, torch.randn(2, 3, 20, 20), style="tensorrt")
    init = {i.name: numpy_helper.to_array(i) for i in mp.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in mp.graph.node if n.op_type == "Constant"
              and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR}
    for n in mp.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = init.get(n.input[2], consts.get(n.input[2]))
            assert zp is not None and zp.dtype == np.int8 and not zp.any(), n.name
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():
        ref = qs(x)
    assert float((OrtModel(mp, threads=1)(x) - ref).abs().max()) <= _lsb_bound(qs) + 1e-5


class _Seq1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 5, padding=2)
        self.c2 = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.mean(-1))


def test_conv1d_model_exports_with_a_dynamic_length():
    q = _quantized(_Seq1d())
    mp = to_onnx_torch(q, torch.randn(2, 2, 50))
    ort = OrtModel(mp, threads=1)
    x = torch.randn(3, 2, 77)
    with torch.no_grad():
        ref = q(x)
    assert float((ort(x) - ref).abs().max()) <= _lsb_bound(q) + 1e-5


def test_uint8_weights_keep_the_real_values_and_the_fused_kernels_exact():
    """The int8 -> uint8 weight rewrite OrtModel applies on x86 CPUs without VNNI: the same real weights (equal
    outputs unoptimised), and ONNX Runtime's fused kernels within one LSB on every CPU."""
    import onnxruntime as ort

    torch.manual_seed(1)
    q = _quantized(_Seq1d())
    mp = to_onnx_torch(q, torch.randn(2, 2, 50))
    m8 = uint8_weights(mp)
    dtypes = lambda m: sorted(onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in m.graph.initializer
                              if len(i.dims) >= 2)
    assert dtypes(mp) == ["int8"] * 3 and dtypes(m8) == ["uint8"] * 3
    x = torch.randn(3, 2, 77)

    def run(m, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]

    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert np.array_equal(run(mp, off), run(m8, off))
    with torch.no_grad():
        ref = q(x)
    fused = run(m8, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    assert float(np.abs(fused - ref.numpy()).max()) <= _lsb_bound(q) + 1e-5
    counts = optimized_op_counts(m8)
    assert any(k.endswith("QLinearConv") for k in counts), counts  # the integer kernels, no float fallback


def test_fixed_size_graph_asks_for_batch_only_and_exports_with_it():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 20 * 20, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.c(x)).flatten(1))

    q = _quantized(Flat())
    with pytest.raises(ValueError, match="dynamic='batch'"):
        to_onnx_torch(q, torch.randn(2, 3, 20, 20), dynamic="spatial")
    mp = to_onnx_torch(q, torch.randn(2, 3, 20, 20))  # auto: batch only
    assert {p.key: p.value for p in mp.metadata_props}["qcnn_dynamic"] == "batch"
    assert [d.dim_value for d in mp.graph.input[0].type.tensor_type.shape.dim][1:] == [3, 20, 20]
    x = torch.randn(5, 3, 20, 20)
    with torch.no_grad():
        ref = q(x)
    assert float((OrtModel(mp, threads=1)(x) - ref).abs().max()) <= _lsb_bound(q) + 1e-5
    with pytest.raises(ValueError, match="no quantizers"):
        to_onnx_torch(Flat().eval(), torch.randn(2, 3, 20, 20))
    with pytest.raises(ValueError, match="style='trt'"):
        deploy_copy(q, "trt")


def test_export_command_torch_and_tensorrt_forms(tmp_path):
    from qcnn.checkpoint import save_model
    from qcnn.cli import main
    from qcnn.models import arch_record, build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3)
    recipe = {"method": "uniform", "first_last": "8bit", "params": {"act_grid": "symmetric"}}
    q = quantize(model.eval(), recipe).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(16, 3, 32, 32))
    ckpt = save_model(tmp_path / "m.pt", q, arch_record(q), recipe=recipe)
    for form in ("torch", "tensorrt"):
        out = tmp_path / f"{form}.onnx"
        assert main(["export", "--checkpoint", str(ckpt), "--onnx-form", form, "--out", str(out)]) == 0
        x = torch.randn(3, 3, 40, 48)  # not the 32x32 of the export
        with torch.no_grad():
            ref = q(x)
        got = OrtModel(onnx.load(str(out)), threads=1)(x)
        assert (got.argmax(1) == ref.argmax(1)).all()
        assert float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def test_pact_lenet_exports_with_odd_weight_codes_and_per_tensor_weight_scales():
    """PACT W4A4 (DoReFa weights: odd codes on one scale, 4-bit activations in an 8-bit container) exports and
    ONNX Runtime stays within one LSB of the last layer's input grid; the graph fixes the size: batch only."""
    from qcnn.models import build_model

    torch.manual_seed(0)
    q = quantize(build_model("lenet5", num_classes=10, in_channels=1).eval(),
                 {"method": "pact", "w_bits": 4, "a_bits": 4, "first_last": "same"}).eval()
    x = torch.randn(16, 1, 28, 28)
    with torch.no_grad(), calibrating(q):
        q(x)
    mp = to_onnx_torch(q, x[:2])
    init = {i.name: numpy_helper.to_array(i) for i in mp.graph.initializer}
    codes = [v for v in init.values() if v.dtype == np.int8 and v.ndim >= 2]
    assert len(codes) == 5 and all(set(np.unique(c)) <= set(range(-15, 16, 2)) for c in codes)
    with torch.no_grad():
        ref = q(x)
    fc = q.fc3
    bound = float(fc.input_quant.grid().scale) * float(fc.quantized_weight().detach().abs().sum(1).max())
    assert float((OrtModel(mp, threads=1)(x) - ref).abs().max()) <= bound + 1e-6


def test_auto_falls_back_to_a_dynamic_batch_where_torch_export_proves_a_size_guard():
    """SqueezeNet 1.0 runs at other sizes in torch, but torch.export fails on symbolic height / width (its
    ceil-mode pools): ``dynamic='auto'`` then exports a dynamic batch, says so, and records it."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_0(weights=None, num_classes=10).eval()
    q = quantize(net, {"method": "uniform", "w_bits": 8, "a_bits": 8, "fold_bn": True}).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(4, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="torch.onnx.export failed .*--dynamic batch"):
        to_onnx_torch(q, x, dynamic="spatial")
    with pytest.warns(UserWarning, match="exported with a dynamic batch only"):
        mp = to_onnx_torch(q, x)
    assert {p.key: p.value for p in mp.metadata_props}["qcnn_dynamic"] == "batch"
    xx = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = q(xx)
    got = OrtModel(mp, threads=2)(xx)
    assert got.shape == ref.shape and float((got - ref).abs().max()) <= 0.05 * float(ref.abs().max())

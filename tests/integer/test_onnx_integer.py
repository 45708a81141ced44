"""The integer ONNX form: ONNX Runtime reproduces the integer engine and the float64 simulation bit for bit."""

from __future__ import annotations

import onnx
import pytest
import torch

from qcnn.integer import run_engine, to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.onnx_export import OrtModel, ort_codes, to_onnx
from tests.integer.test_engine import fuzzed_net as _net


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,method", [(8, "uniform"), (4, "fqn"), (8, "fqn"), (4, "dorefa"), (3, "pact")])
def test_fuzzed_nets_onnx_runtime_equals_engine_and_float64_simulation(seed, bits, method):
    """Random conv nets (strides, groups, depthwise, residual adds, max / average pools, ReLU6, both heads;
    8-bit FQN has asymmetric per-channel weights: the zero-point correction path) run in ONNX Runtime with
    integer operators only and give the engine's codes and logits exactly, equal to the float64
    simulation's codes, end to end and per layer."""
    q, x = _net(seed, bits, method)
    ref64, sim64 = simulation_codes(q, x, dtype=torch.float64)
    im = to_integer(q, x)
    out, codes = im.run(x, record=True)
    model, names = to_onnx(im, with_codes=True, form="integer")
    logits, got = ort_codes(model, names, x, threads=1)
    assert compare_codes(got, codes) == compare_codes(codes, codes)  # every point, all equal
    assert compare_codes(got, sim64)["equal"] == 1.0
    assert torch.equal(logits, out)
    forced_model, forced_names = to_onnx(im, with_codes=True, forced=True, form="integer")
    _, per_layer = ort_codes(forced_model, forced_names, x, force=sim64, threads=1)
    cmp = compare_codes(per_layer, sim64)
    assert cmp["equal"] == 1.0 and cmp["points"] == len(sim64), cmp


def test_integer_form_uses_only_integer_kernels_between_input_and_logits():
    q, x = _net(1, 8, "fqn")
    m = to_onnx(to_integer(q, x), form="integer")
    ops = {n.op_type for n in m.graph.node}
    assert "ConvInteger" in ops and "MatMulInteger" in ops
    assert not ops & {"Conv", "Gemm", "MatMul", "QLinearConv", "QuantizeLinear", "DequantizeLinear", "AveragePool"}
    # float arithmetic only quantizes the input (one cast) and dequantizes the logits (float64, then float32),
    # plus the exact float64 copies MaxPool runs on
    casts = [n for n in m.graph.node if n.op_type == "Cast"]
    to_float = [n for n in casts if n.attribute[0].i in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)]
    pools = sum(n.op_type == "MaxPool" for n in m.graph.node)
    assert len(to_float) == 3 + pools
    onnx.checker.check_model(m)


def test_integer_form_needs_the_int64_scheme_and_run_engine_uses_it():
    q, x = _net(0, 8, "uniform")
    with pytest.raises(ValueError, match="requant='int64'"):
        to_onnx(to_integer(q, x, requant="int32"), form="integer")
    y = to_integer(q, x)(x).argmax(1)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    assert run_engine("onnxruntime-integer", q, loader, threads=1)["top1"] == 100.0
    assert torch.equal(OrtModel(to_onnx(to_integer(q, x), form="integer"), threads=1)(x), to_integer(q, x)(x))


def test_int8_deployment_model_runs_bit_exact():
    """Residual operands quantized and ReLU'd sums on shared grids (ReLU clamps then act on codes)."""
    from qcnn.integer import share_relu_grids
    from tests.integer.test_onnx_export import _model

    q = share_relu_grids(_model(residual_int8=True))
    x = torch.randn(8, 3, 12, 12)
    im = to_integer(q, x)
    assert any(op.kind == "clamp" for op in im.ops) or any(op.kind == "add" for op in im.ops)
    out, codes = im.run(x, record=True)
    logits, got = ort_codes(*to_onnx(im, with_codes=True, form="integer"), x, threads=1)
    assert compare_codes(got, codes)["equal"] == 1.0
    assert torch.equal(logits, out)
    assert compare_codes(codes, simulation_codes(q, x, dtype=torch.float64)[1])["equal"] == 1.0

"""Bias on the int32 accumulator grid: exact multiples of s_x s_w, pass-through before calibration, and the
agreement it buys between ONNX Runtime (int32 bias in the accumulator) and the simulation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import AccumulatorBias, add_bias_quantizers, to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.onnx_export import ort_codes, to_onnx
from qcnn.methods import quantize


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(torch.flatten(nn.functional.max_pool2d(x, 2), 1))


def _net(bits=4, bias=True):
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.conv2.bias.uniform_(-0.3, 0.3)
    q = quantize(net, {"method": "uniform", "w_bits": bits, "a_bits": bits, "first_last": "same",
                       "fold_bn": True}).eval()
    if bias:
        add_bias_quantizers(q)
    with torch.no_grad(), calibrating(q):
        q(torch.randn(64, 3, 12, 12))
    return q


def test_bias_is_an_int32_multiple_of_the_accumulator_step():
    q = _net()
    for name in ("conv1", "conv2", "fc"):
        mod = q.get_submodule(name)
        s = float(mod.input_quant.grid().scale) * mod.weight_quant.grid().scale.double().reshape(-1)
        codes = mod.quantized_bias().double() / s
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert not torch.equal(mod.quantized_bias(), mod.bias)  # it does round
        assert (mod.quantized_bias() - mod.bias).abs().max() <= 0.5 * s.max() * (1 + 1e-5)
    # gradient is straight-through
    b = q.conv2.bias
    q.conv2.quantized_bias().sum().backward()
    assert torch.equal(b.grad, torch.ones_like(b))


def test_bias_passes_through_before_calibration_and_needs_biases():
    torch.manual_seed(0)
    q = quantize(_Net().eval(), {"method": "uniform", "first_last": "same", "fold_bn": True})
    add_bias_quantizers(q)
    assert torch.equal(q.conv2.quantized_bias(), q.conv2.bias)  # input grid not calibrated yet
    assert torch.equal(AccumulatorBias()(q.fc.bias, nn.Linear(2, 2)), q.fc.bias)  # a layer without quantizers
    with pytest.raises(ValueError, match="GraphModule"):
        add_bias_quantizers(_Net())
    plain = quantize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False)).eval(), {"method": "uniform"})
    with pytest.raises(ValueError, match="no quantized conv"):
        add_bias_quantizers(plain)


@pytest.mark.parametrize("form", ["qdq", "qlinear"])
def test_bias_quantizer_makes_onnx_runtime_agree_per_layer(form):
    x = torch.randn(16, 3, 12, 12)
    res = {}
    for bias in (False, True):
        q = _net(bits=4, bias=bias)
        im = to_integer(q, x)
        _, sim = simulation_codes(q, x)
        model, names = to_onnx(im, with_codes=True, forced=True, form=form)
        _, got = ort_codes(model, names, x, force=sim, threads=1)
        res[bias] = compare_codes(got, sim)
        assert res[bias]["max_diff"] <= 1
    # 4-bit grids: one accumulator unit is a large part of an output step, so a rounded int32 bias that the
    # simulation does not model moves many codes; with the bias quantizer only float ties remain
    assert res[False]["equal"] < 0.999
    assert res[True]["equal"] >= 0.9999, res[True]

"""Lowering to PyTorch's quantized CPU kernels: codes and predictions agree with the simulation and the engine."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import add_bias_quantizers, to_integer
from qcnn.integer.torch_backend import int16_pairs_saturate, to_torch_quantized
from qcnn.methods import quantize

pytestmark = pytest.mark.skipif(not torch.backends.quantized.supported_engines or
                                torch.backends.quantized.engine == "none", reason="no quantized CPU engine")


class _Lenet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _lenet(w_bits: int):
    torch.manual_seed(0)
    q = quantize(_Lenet().eval(), {"method": "uniform", "w_bits": w_bits,
                                   "first_last": "8bit" if w_bits == 8 else "same"}).eval()
    add_bias_quantizers(q)
    x = torch.randn(64, 1, 12, 12)
    with torch.no_grad(), calibrating(q):
        q(x)
    return q, x, to_integer(q, x)


@pytest.mark.parametrize("w_bits", [7, 8])
def test_lowering_of_a_lenet_matches_the_simulation(w_bits):
    """7-bit weights are exact on every x86 CPU; 8-bit weights on an 8-bit input grid are where the kernels'
    saturating int16 pairs (x86 without AVX512-VNNI) bite: there the lowering warns, naming the first conv."""
    q, x, im = _lenet(w_bits)
    if w_bits == 8 and int16_pairs_saturate():
        with pytest.warns(RuntimeWarning, match=r"saturating int16.*conv1 \(2 x 255 x 127\)"):
            to_torch_quantized(im)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tq = to_torch_quantized(im)
    with torch.no_grad():
        ref, out, eng = q(x), tq(x), im(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    step = float(q.fc2.input_quant.grid().scale) * float(q.fc2.weight_quant.grid().scale.max()) * 12 * 255
    assert (out - ref).abs().max() < 0.02 * step + 1e-3  # a few near-tie codes at most
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert (out.argmax(1) == eng.argmax(1)).float().mean() >= 0.95


@pytest.mark.filterwarnings("ignore:on this CPU")  # its tolerance allows the saturated pairs
def test_residual_deployment_model_lowers_and_agrees():
    from tests.integer.test_onnx_export import _deploy  # the residual test network of the ONNX tests

    q = _deploy()
    x = torch.randn(32, 3, 12, 12)
    tq = to_torch_quantized(to_integer(q, x))
    with torch.no_grad():
        ref, out = q(x), tq(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert torch.allclose(out, ref, atol=0.05 * float(ref.abs().max()))


def test_lowering_refuses_float_residual_operands():
    from tests.integer.test_onnx_export import _deploy

    q = _deploy(share=False, residual=False)
    with pytest.raises(ValueError, match="requantization|not quantized|float"):
        to_torch_quantized(to_integer(q, torch.randn(2, 3, 12, 12)))

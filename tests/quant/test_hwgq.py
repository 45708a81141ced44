"""HWGQ: the paper's levels (and their numerical recomputation), forward, clipped/log-tailed backward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcnn.methods import calibrate, quantize
from qcnn.quant.hwgq import BinaryChannelWeight, HWGQActivation, half_normal_levels, half_normal_mse, hwgq_levels
from qcnn.recipes import Recipe


def test_numerical_levels_match_paper():
    assert half_normal_levels(1, "lloyd") == pytest.approx([0.798], abs=1e-3)
    assert half_normal_levels(1, "uniform") == pytest.approx([0.798], abs=1e-3)
    assert half_normal_levels(3, "lloyd") == pytest.approx([0.318, 1.000, 1.894], abs=1e-3)
    assert half_normal_levels(3, "uniform")[0] == pytest.approx(0.538, abs=1e-3)  # the step d of {d, 2d, 3d}
    assert math.isclose(half_normal_levels(1, "lloyd")[0], math.sqrt(2 / math.pi), rel_tol=1e-6)
    # Lloyd-Max beats the uniform grid at the same number of levels
    assert half_normal_mse(hwgq_levels(2, "lloyd")) < half_normal_mse(hwgq_levels(2, "uniform"))
    assert hwgq_levels(2, "uniform") == [0.538, 1.076, 1.614]


def test_uniform_forward_and_clipped_relu_backward():
    x = torch.tensor([-1.0, 0.0, 0.1, 0.8, 0.81, 1.5, 1.614, 3.0], requires_grad=True)
    y = HWGQActivation(2, "uniform")(x)  # thresholds 0.807, 1.345
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.538, 0.538, 1.076, 1.614, 1.614, 1.614]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_lloyd_forward_and_log_tail():
    x = torch.tensor([-0.2, 0.5, 0.7, 1.4, 1.5, 3.0], requires_grad=True)
    y = HWGQActivation(2, "lloyd", log_tail=True)(x)  # thresholds 0.659, 1.447
    assert torch.allclose(y, torch.tensor([0.0, 0.318, 1.0, 1.0, 1.894, 1.894]))
    y.sum().backward()
    tail = 1.0 / (3.0 - (1.894 - 1.0))
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, tail]))


def test_one_bit_and_grids():
    q = HWGQActivation(1)
    assert torch.allclose(q(torch.tensor([-1.0, 0.01, 5.0])), torch.tensor([0.0, 0.798, 0.798]))
    g = HWGQActivation(2, "uniform").grid()
    assert (g.qmin, g.qmax) == (0, 3) and math.isclose(float(g.scale), 0.538, rel_tol=1e-6)
    gl = HWGQActivation(2, "lloyd").grid()
    assert torch.allclose(gl.levels, torch.tensor([0.0, 0.318, 1.0, 1.894]))


def test_binary_per_channel_weights():
    w = torch.tensor([[0.2, -0.4], [1.0, 3.0]], requires_grad=True)
    q = BinaryChannelWeight()
    y = q(w)
    assert torch.allclose(y, torch.tensor([[0.3, -0.3], [2.0, 2.0]]))
    y.backward(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(w.grad, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.allclose(q.grid().scale, torch.tensor([0.3, 2.0]))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_prepare_turns_bn_affine_off_and_round_trip():
    torch.manual_seed(0)
    recipe = Recipe(method="hwgq", w_bits=1, a_bits=2)
    q = quantize(_Net(), recipe)
    assert not q.bn1.affine and q.bn1.weight is None and "bn1.weight" not in q.state_dict()
    assert q.bn2.affine and "bn2.weight" in q.state_dict()  # feeds the classifier (8-bit): keeps gamma/beta
    assert isinstance(q.conv2.input_quant, HWGQActivation) and isinstance(q.conv2.weight_quant, BinaryChannelWeight)
    x = torch.randn(4, 1, 6, 6)
    calibrate(q, [(x, None)])
    q.eval()
    q2 = quantize(_Net(), recipe)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.eval()(x), q(x))
    kept = quantize(_Net(), Recipe(method="hwgq", w_bits=1, a_bits=2, params={"bn_affine": True}))
    assert kept.bn1.affine

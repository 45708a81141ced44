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


def test_fused_kernels_match_eager():
    """Fused HWGQ kernels (uniform and Lloyd levels, log tail, scaled in eval: bit for bit; scaled in training, the EMA
    step in the kernel: its float32 sum of squares runs in the compiled kernel's order, so ``s`` and through it the
    output and gradient to float rounding) and the binary channel weight (a float32 mean: to rounding)."""
    from qcnn.quant import kernels
    from tests.quant.kernel_check import assert_fused_matches, run

    torch.manual_seed(0)
    x = torch.randn(4, 16, 16, 16) * 1.5
    names = ("_hwgq_forward", "_hwgq_backward")
    assert_fused_matches(HWGQActivation(2), x, kernel_names=names)
    assert_fused_matches(HWGQActivation(2, "lloyd", log_tail=True), x, kernel_names=names)

    q = HWGQActivation(2, normalized=False)
    q.sigma.fill_(1.2)
    q.initialized.fill_(True)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    sigmas = {}

    class Fresh(nn.Module):  # every run starts from the same EMA state
        def forward(self, v):
            q.load_state_dict(state)
            y = q(v)
            sigmas[kernels.mode()] = q.sigma.clone()
            return y

    g = torch.randn_like(x)
    before = kernels.fused_calls().get("_hwgq_track_forward", 0)
    (y0, dx0, _), (y1, dx1, _) = run(Fresh().train(), x, g, "eager"), run(Fresh().train(), x, g, "fused")
    assert kernels.fused_calls()["_hwgq_track_forward"] > before and not kernels.failures()
    assert not torch.equal(sigmas["eager"], state["sigma"])
    torch.testing.assert_close(sigmas["fused"], sigmas["eager"], rtol=1e-6, atol=0)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=0)
    q.eval()
    assert_fused_matches(q, x, kernel_names=names)

    w = torch.randn(64, 32, 3, 3)
    b = BinaryChannelWeight()
    before = kernels.fused_calls().get("_channel_binary_forward", 0)
    (y0, dx0, _), (y1, dx1, _) = run(b, w, g := torch.randn_like(w), "eager"), run(b, w, g, "fused")
    assert kernels.fused_calls()["_channel_binary_forward"] > before
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=0)
    assert torch.equal(dx0, dx1) and torch.equal(dx0, g)


def test_eager_numerics_are_the_float32_sums():
    """Regression: eagerly the EMA step uses the float32 sum of squares of the batch (and the calibration the same
    sum), and the binary channel weight's scale is the float32 per-channel mean, exactly."""
    torch.manual_seed(2)  # a batch whose float32 and float64 sums give different s
    x = torch.randn(8, 16, 32, 32) * 1.5
    pos = x.clamp_min(0)
    s_batch = torch.sqrt((pos * pos).sum() / (x > 0).sum()).clamp_min(1e-8)
    q = HWGQActivation(2, normalized=False).train()
    q(x)  # uninitialised: s is the batch value
    assert torch.equal(q.sigma, s_batch) and bool(q.initialized)
    q(x)
    assert torch.equal(q.sigma, 0.9 * s_batch + 0.1 * s_batch)
    sq, n = HWGQActivation._positive_moments(x)
    assert sq.dtype == torch.float32 and torch.equal(sq, (pos * pos).sum()) and int(n) == int((x > 0).sum())
    w = torch.randn(256, 128, 3, 3) * 0.05
    b = BinaryChannelWeight()
    y = b(w)
    s = w.abs().reshape(256, -1).mean(dim=1)
    assert torch.equal(b.scale, s)
    sb = s.reshape(-1, 1, 1, 1)
    assert torch.equal(y, w + (torch.where(w >= 0, sb, -sb) - w))

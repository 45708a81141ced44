"""WRPN: unsigned clip-to-[0,1] activations, signed weights on round((2^(k-1)-1) clip(w)), 1-bit sign."""

from __future__ import annotations

import torch
from torch import nn

from qcnn.methods import calibrate, quantize
from qcnn.methods.base import get_method
from qcnn.quant.dorefa import DoReFaActivation
from qcnn.quant.wrpn import WRPNWeight
from qcnn.recipes import Recipe


def test_ternary_weights_literal_form_and_masked_ste():
    w = torch.tensor([-1.5, -0.6, -0.4, 0.2, 0.7, 1.2], requires_grad=True)
    y = WRPNWeight(2)(w)  # n = 1: ternary on the raw weights
    assert torch.equal(y, torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]))
    y.backward(torch.arange(1.0, 7.0))
    assert torch.equal(w.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))


def test_four_bit_weights_grid():
    w = torch.linspace(-1.2, 1.2, 241)
    q = WRPNWeight(4)
    y = q(w)
    assert torch.allclose(y, torch.round(7 * w.clamp(-1, 1)) / 7)
    assert y.unique().numel() == 15
    g = q.grid()
    assert (g.qmin, g.qmax) == (-7, 7)
    assert torch.allclose(g.from_codes(g.to_codes(y)), y, atol=1e-6)


def test_max_scale_per_channel():
    w = torch.tensor([[0.1, -0.06, 0.02], [2.0, 1.2, -0.4]], requires_grad=True)
    y = WRPNWeight(2, weight_scale="max", per_channel=True)(w)
    assert torch.allclose(y, torch.tensor([[0.1, -0.1, 0.0], [2.0, 2.0, 0.0]]))
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # |w / max| <= 1 everywhere


def test_binary_weight_scales():
    w = torch.tensor([[-0.3, 0.1], [0.5, -0.1]], requires_grad=True)
    assert torch.allclose(WRPNWeight(1)(w), torch.sign(w.detach()) * 0.25)  # mean|w|
    assert torch.equal(WRPNWeight(1, binary_scale="none")(w), torch.sign(w.detach()))
    y = WRPNWeight(1, binary_scale="mean", per_channel=True)(w)
    assert torch.allclose(y, torch.tensor([[-0.2, 0.2], [0.3, -0.3]]))
    y.backward(torch.ones_like(w))
    assert torch.equal(w.grad, torch.ones_like(w))


def test_activation_is_unsigned_clip_quant():
    x = torch.tensor([-0.3, 0.1, 0.5, 0.95, 1.4])
    y = get_method("wrpn").low_act(type("C", (), {"a_bits": 2, "input_signed": False})())(x)
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 2 / 3, 1.0, 1.0]))


def test_bad_option_is_refused():
    import pytest

    with pytest.raises(ValueError, match="weight_scale"):
        get_method("wrpn", {"weight_scale": "median"})


def test_method_and_state_dict_round_trip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    recipe = Recipe(method="wrpn", w_bits=2, a_bits=2, params={"weight_scale": "max"})
    q = quantize(net, recipe)
    x = torch.randn(3, 1, 6, 6)
    calibrate(q, [(x, None)])
    assert isinstance(q.get_submodule("2").weight_quant, WRPNWeight)
    assert isinstance(q.get_submodule("2").input_quant, DoReFaActivation)
    q.eval()
    q2 = quantize(net, recipe)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.eval()(x), q(x))


def test_fused_kernels_match_eager():
    """Fused WRPN weight kernels (per-channel max, per-tensor max, fixed grid: bit for bit; the 1-bit mean: a float32
    sum in the compiled kernel's order, so the output and scale to float rounding, the identity gradient exactly)."""
    from qcnn.quant import kernels
    from tests.quant.kernel_check import assert_fused_matches, run

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.05
    names = ("_wrpn_forward", "_wrpn_backward")
    assert_fused_matches(WRPNWeight(4, "max", per_channel=True), w, kernel_names=names)
    assert_fused_matches(WRPNWeight(2, "max"), w, kernel_names=names)
    assert_fused_matches(WRPNWeight(3, "none"), w * 20, kernel_names=names)
    assert_fused_matches(WRPNWeight(1, binary_scale="max", per_channel=True), w, kernel_names=("_binary_forward",))
    for per_channel in (True, False):
        q = WRPNWeight(1, binary_scale="mean", per_channel=per_channel)
        g = torch.randn_like(w)
        before = kernels.fused_calls().get("_binary_forward", 0)
        (y0, dx0, _), (y1, dx1, _) = run(q, w, g, "eager"), run(q, w, g, "fused")
        assert kernels.fused_calls()["_binary_forward"] > before and not kernels.failures()
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=0)
        assert torch.equal(dx0, dx1) and torch.equal(dx0, g)
        with kernels.use("fused"):
            q(w)
        mean = w.abs().reshape(64, -1).mean(dim=1) if per_channel else w.abs().mean()
        torch.testing.assert_close(q.scale, mean, rtol=1e-6, atol=0)


def test_eager_binary_mean_is_the_float32_mean():
    """Regression: the eager 1-bit scale is exactly the float32 ``mean|w|`` (per channel or per tensor), and the
    output ``w + (s sign(w) - w)`` in those ops."""
    torch.manual_seed(5)
    w = torch.randn(256, 128, 3, 3) * 0.05
    assert not torch.equal(w.abs().mean(), w.abs().mean(dtype=torch.float64).float())  # the sums' dtype matters here
    for per_channel in (True, False):
        q = WRPNWeight(1, binary_scale="mean", per_channel=per_channel)
        y = q(w)
        s = w.abs().reshape(256, -1).mean(dim=1) if per_channel else w.abs().mean()
        assert torch.equal(q.scale, s)
        sb = s.reshape(-1, 1, 1, 1) if per_channel else s
        assert torch.equal(y, w + (torch.where(w >= 0, sb, -sb) - w))

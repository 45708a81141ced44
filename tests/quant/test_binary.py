"""Bi-Real binarization: sign forward, ApproxSign and the magnitude-aware gradient on hand-computed cases."""

from __future__ import annotations

import torch

from qcnn.methods import quantize
from qcnn.methods.bireal import BiRealMethod
from qcnn.quant.binary import ApproxSignQuantizer, MagnitudeAwareBinaryWeight, approx_sign_grad
from qcnn.recipes import Recipe


def test_approx_sign_forward_and_backward_by_hand():
    x = torch.tensor([-1.5, -1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 0.999, 1.0, 2.0], requires_grad=True)
    y = ApproxSignQuantizer()(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1, -1, -1, 1, 1, 1, 1, 1, 1]))
    g = torch.arange(1.0, 11.0)
    y.backward(g)
    # 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere; times the incoming gradient
    d = torch.tensor([0.0, 0.0, 0.5, 1.5, 2.0, 1.5, 0.5, 2 - 2 * 0.999, 0.0, 0.0])
    assert torch.allclose(x.grad, g * d, atol=1e-5)
    assert torch.allclose(approx_sign_grad(x.detach()), d, atol=1e-6)


def test_magnitude_aware_weight_by_hand():
    w = torch.tensor([[0.5, -1.5, 0.25, 0.0], [-0.2, -0.2, 0.6, 3.0]], requires_grad=True)
    q = MagnitudeAwareBinaryWeight()
    wb = q(w)
    s = torch.tensor([[0.5625], [1.0]])  # mean|W| per output channel: 2.25/4, 4.0/4
    assert torch.allclose(wb.detach(), s * torch.tensor([[1.0, -1, 1, 1], [-1, -1, 1, 1]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    wb.backward(g)
    # dL/dW_r = dL/dW_b * mean|W_r| * 1{|W_r| < 1}
    expect = g * s * torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 0]])
    assert torch.allclose(w.grad, expect)
    grid = q.grid()
    assert grid.axis == 0 and torch.allclose(grid.scale, s.flatten())
    assert torch.equal(grid.to_codes(wb.detach()), torch.tensor([[1, -1, 1, 1], [-1, -1, 1, 1]], dtype=torch.int32))


def test_conv_weight_scale_is_per_output_channel():
    w = torch.randn(4, 3, 3, 3)
    wb = MagnitudeAwareBinaryWeight()(w)
    for o in range(4):
        assert torch.allclose(wb[o].abs(), w[o].abs().mean().expand(3, 3, 3))


def test_method_places_binary_quantizers_and_keeps_shortcuts_real():
    from qcnn.models.bireal import BiRealCifarResNet
    from qcnn.nn.layers import QAdd

    q = quantize(BiRealCifarResNet(20, width=0.25), Recipe(method="bireal", w_bits=1, a_bits=1, first_last="fp32"))
    convs = [(n, m) for n, m in q.named_modules() if isinstance(m, torch.nn.Conv2d)]
    binary = [n for n, m in convs if isinstance(getattr(m, "weight_quant", None), MagnitudeAwareBinaryWeight)]
    assert len(binary) == 18  # every 3x3 conv of the 9 blocks
    for n, m in convs:
        if m.kernel_size == (1, 1) or n == "conv1":
            assert getattr(m, "weight_quant", None) is None and getattr(m, "input_quant", None) is None
        else:
            assert isinstance(m.input_quant, ApproxSignQuantizer)
    assert all(m.out_quant is None for m in q.modules() if isinstance(m, QAdd))
    assert BiRealMethod.defines(1, 1) is None and BiRealMethod.defines(2, 1) is not None
    y = q(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_fused_kernels_match_eager():
    """Fused ApproxSign and magnitude-aware weight kernels equal the eager path (forward, gradient, scale)."""
    from qcnn.quant import kernels
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    assert_fused_matches(ApproxSignQuantizer(), torch.randn(4, 16, 16, 16) * 0.7,
                         kernel_names=("binary_sign", "_sign_backward[approx_sign_grad]"))
    q = MagnitudeAwareBinaryWeight()
    w = torch.randn(64, 32, 3, 3) * 0.5
    assert_fused_matches(q, w, kernel_names=("_mag_binary_forward", "_mag_binary_backward"))
    for mode in ("eager", "fused"):
        with kernels.use(mode):
            q(w)
        assert torch.equal(q.scale, w.abs().double().mean(dim=(1, 2, 3)).float())


def test_eager_binary_keeps_the_plain_numerics():
    """Regression: eagerly ApproxSign's gradient is ``g approx_sign_grad(x)`` and the magnitude-aware weight
    ``s sign(w)`` (``s`` the float64-accumulated per-channel mean, in float32) with gradient ``g s [|w| < 1]``."""
    torch.manual_seed(1)
    x = torch.randn(8, 16, 32, 32) * 0.7
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    y = ApproxSignQuantizer()(xg)
    y.backward(g)
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0)) and torch.equal(xg.grad, g * approx_sign_grad(x))
    w = torch.randn(256, 128, 3, 3) * 0.5
    gw = torch.randn_like(w)
    q = MagnitudeAwareBinaryWeight()
    wg = w.clone().requires_grad_(True)
    y = q(wg)
    y.backward(gw)
    s = w.abs().double().mean(dim=(1, 2, 3), keepdim=True).float()
    assert torch.equal(q.scale, s.flatten()) and torch.equal(y, s * torch.where(w >= 0, 1.0, -1.0))
    assert torch.equal(wg.grad, gw * s * (w.abs() < 1).float())

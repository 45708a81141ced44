"""WAGE quantizers: grids of W, A, E and G, the layer scale, init and the on-grid training loop."""

from __future__ import annotations

import math

import pytest
import torch

from qcnn.methods import quantize
from qcnn.methods.wage import WageSGD, wage_clip_, wage_init
from qcnn.quant.wage import (
    WageActQuantizer,
    WageErrorQuantizer,
    WageWeightQuantizer,
    layer_alpha,
    shift,
    wage_c,
    wage_q,
    wage_update,
)
from qcnn.recipes import Recipe


def on_grid(x: torch.Tensor, k: int) -> bool:
    s = 2.0 ** (k - 1)
    return bool(torch.all((x * s) == torch.round(x * s)))


def test_q_c_shift_by_hand():
    x = torch.tensor([-0.9, -0.3, -0.2, 0.0, 0.26, 0.74, 2.0])
    assert torch.equal(wage_q(wage_c(x, 2), 2), torch.tensor([-0.5, -0.5, -0.0, 0.0, 0.5, 0.5, 0.5]))
    assert torch.equal(wage_c(torch.tensor([-2.0, 2.0]), 8), torch.tensor([-1 + 1 / 128, 1 - 1 / 128]))
    assert torch.equal(shift(torch.tensor([0.3, 0.7, 3.0, 1.0])), torch.tensor([0.25, 0.5, 4.0, 1.0]))
    assert torch.isfinite(shift(torch.tensor(0.0)))


def test_layer_alpha_matches_formula():
    # L = sqrt(3/fan_in); Lmin = 1.5 * 2^(1-kW); alpha = max(2^round(log2(Lmin/L)), 1)
    for fan_in, k in [(25, 2), (150, 2), (1152, 2), (4608, 2), (8192, 2), (25, 8), (3, 2)]:
        lim, lmin = math.sqrt(3 / fan_in), 1.5 * 2.0 ** (1 - k)
        assert layer_alpha(fan_in, k) == max(2.0 ** round(math.log2(lmin / lim)), 1.0)
    assert layer_alpha(1152, 2) == 16.0  # VGG-7 conv 128->128: L = 0.051, Lmin = 0.75 -> 14.7 -> 16
    with pytest.raises(ValueError, match="fan_in"):
        layer_alpha(0, 2)


def test_weight_quantizer_forward_backward():
    q = WageWeightQuantizer(2, fan_in=1152)
    w = torch.tensor([-0.7, -0.2, 0.1, 0.3, 0.9], requires_grad=True)
    y = q(w)
    assert torch.equal(y.detach(), torch.tensor([-0.5, 0.0, 0.0, 0.5, 0.5]) / 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones(5))  # identity backward
    g = q.grid()
    assert float(g.scale) == 0.5 / 16 and (g.qmin, g.qmax) == (-1, 1)
    assert torch.equal(g.from_codes(g.to_codes(y.detach())), y.detach())


def test_act_quantizer_keeps_clip_mask():
    q = WageActQuantizer(8, e_bits=None)
    x = torch.tensor([-1.5, -0.30001, 0.0, 0.5, 0.995, 1.2], requires_grad=True)
    y = q(x)
    assert on_grid(y.detach(), 8)
    assert torch.equal(y.detach()[[0, 5]], torch.tensor([-127 / 128, 127 / 128]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 1, 1, 0, 0]))


def test_error_quantizer_formula():
    e = torch.tensor([0.003, -0.0011, 0.0004, -0.006, 0.0])
    q = WageErrorQuantizer(8).quantize_grad(e)
    # max|e| = 0.006 -> Shift = 2^round(log2 0.006) = 2^-7
    expect = torch.round(torch.clamp(e * 128, -127 / 128, 127 / 128) * 128) / 128
    assert torch.equal(q, expect)
    assert torch.equal(WageErrorQuantizer(8).quantize_grad(torch.zeros(3)), torch.zeros(3))


def test_update_is_stochastic_rounding_with_lr_inside():
    torch.manual_seed(0)
    g = torch.full((20000,), 0.3)  # Shift(0.3) = 0.25 -> g_n = 1.2; lr 2 -> 2.4 -> 2 or 3 (p = 0.4)
    d = wage_update(g, lr=2.0, g_bits=8)
    ints = d * 128
    assert set(ints.unique().tolist()) == {2.0, 3.0}
    assert abs(float((ints == 3).float().mean()) - 0.4) < 0.02
    assert abs(float(ints.mean()) - 2.4) < 0.02  # unbiased


class _Recorder:
    def __init__(self):
        self.errors: list[torch.Tensor] = []

    def hook(self, module, grad_input, grad_output):
        self.errors.append(grad_input[0].detach().clone())


def _tiny_wage_net():
    from qcnn.models.wage_nets import LeNet5Wage

    torch.manual_seed(0)
    net = LeNet5Wage(10, 1, 1.0, 28)
    recipe = Recipe(method="wage", w_bits=2, a_bits=8, g_bits=8, e_bits=8, first_last="same", per_channel=False)
    q = quantize(net, recipe)
    wage_init(q, torch.Generator().manual_seed(0))
    return q


def test_backward_errors_and_updates_on_grid_weights_stay_on_grid():
    from qcnn.methods.wage import wage_loss

    q = _tiny_wage_net()
    rec = _Recorder()
    errs = [m for m in q.modules() if isinstance(m, WageErrorQuantizer)]
    assert len(errs) == 5  # 4 hidden activations + the network output
    for m in errs:
        m.register_full_backward_hook(rec.hook)
    weights = [m.weight.detach() for m in q.modules()
               if isinstance(getattr(m, "weight_quant", None), WageWeightQuantizer)]
    assert all(on_grid(w, 2) and float(w.abs().max()) <= 0.5 for w in weights)  # init on the 2-bit grid
    opt = WageSGD(q.parameters(), lr=8.0, g_bits=8, w_bits=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(8, 1, 28, 28, generator=gen), torch.randint(0, 10, (8,), generator=gen)
        before = [w.detach().clone() for w in weights]
        opt.zero_grad()
        loss, _ = wage_loss(q, x, y)
        loss.backward()
        opt.step()
        wage_clip_(q)
        for e in rec.errors:  # errors: on the 8-bit grid inside C(., 8), and not all zero
            assert on_grid(e, 8) and float(e.abs().max()) <= 1 - 1 / 128
        assert any(float(e.abs().max()) > 0 for e in rec.errors)
        rec.errors.clear()
        for w, b in zip(weights, before):
            assert on_grid(w - b, 8)  # updates are multiples of 2^(1-kG)
            assert on_grid(w, 8) and float(w.abs().max()) <= 0.5  # stored weights: kG grid inside C(., kW)
            assert on_grid(wage_q(wage_c(w, 2), 2), 2)  # what the layers use: the 2-bit grid
        assert any(not torch.equal(w, b) for w, b in zip(weights, before))
    # every layer's forward weight has exactly the ternary levels {-0.5, 0, 0.5} / alpha
    for m in q.modules():
        if isinstance(getattr(m, "weight_quant", None), WageWeightQuantizer):
            vals = set((m.weight_quant(m.weight) * m.weight_quant.alpha).detach().unique().tolist())
            assert vals <= {-0.5, 0.0, 0.5}


def test_init_range():
    q = _tiny_wage_net()
    fc1 = q.get_submodule("fc1")  # fan_in 400: L = 0.087 < Lmin = 0.75 -> U(-0.75, 0.75) -> Q -> {-.5, 0, .5}
    vals = fc1.weight.unique().tolist()
    assert set(vals) == {-0.5, 0.0, 0.5}
    frac_zero = float((fc1.weight == 0).float().mean())
    assert abs(frac_zero - 1 / 3) < 0.03  # |w| < 0.25 out of U(-0.75, 0.75)


def test_fused_kernels_match_eager():
    """W, A (with E behind it, and alone) and E: fused equals eager bit for bit, kernels compiled."""
    from qcnn.quant.wage import WageActQuantizer, WageErrorQuantizer, WageWeightQuantizer
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.3
    assert_fused_matches(WageWeightQuantizer(2, fan_in=288), w, kernel_names=("_wage_weight_forward",))
    x = torch.randn(4, 16, 16, 16)
    g = torch.randn_like(x) * 1e-3
    assert_fused_matches(WageActQuantizer(8, e_bits=8), x, g,
                         kernel_names=("_wage_act_forward", "_wage_act_error_backward"))
    assert_fused_matches(WageActQuantizer(4, e_bits=None), x, g, kernel_names=("_wage_act_backward",))
    assert_fused_matches(WageErrorQuantizer(8), x, g, kernel_names=("_wage_error",))

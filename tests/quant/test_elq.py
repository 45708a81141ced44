"""ELQ: closed-form binary/ternary scale and threshold, freezing by importance, frozen weights never move."""

from __future__ import annotations

import pytest
import torch

from qcnn.methods.elq import ELQOptions, elq_penalty
from qcnn.quant.elq import ELQWeightQuantizer, binary_params, codes, ternary_params


def test_ternary_and_binary_closed_form_by_hand():
    w = torch.tensor([1.0, -0.2, 0.5, -0.9, 0.05, 0.0])
    alpha, delta = ternary_params(w)
    # mean|W| = 2.65/6; delta = 0.7 * that = 0.30917; |W| > delta: 1.0, 0.5, 0.9 -> alpha = 0.8
    assert delta == pytest.approx(0.7 * 2.65 / 6)
    assert alpha == pytest.approx(0.8)
    assert torch.equal(codes(w, delta, 2), torch.tensor([1.0, 0, 1, -1, 0, 0]))
    alpha_b, _ = binary_params(w)
    assert alpha_b == pytest.approx(2.65 / 6)
    assert torch.equal(codes(w, delta, 1), torch.tensor([1.0, -1, 1, -1, 1, 1]))
    a0, d0 = ternary_params(torch.zeros(5))  # constant tensor: no NaN
    assert float(a0) == 0.0 and float(d0) == 0.0


def test_freeze_by_error_and_gradient_mask():
    w = torch.nn.Parameter(torch.tensor([1.0, -0.2, 0.5, -0.9, 0.05, 0.0, 0.75, -0.65]))
    q = ELQWeightQuantizer(2, criterion="error")
    q.init_scale(w)
    alpha = float(q.alpha)
    wq = q.quantized(w.detach())
    err = (w.detach() - wq).abs()
    q.freeze_fraction(w, 0.5)
    assert int(q.frozen.sum()) == 4
    expect = torch.zeros(8, dtype=torch.bool)
    expect[torch.argsort(err)[:4]] = True
    assert torch.equal(q.frozen, expect)  # the 4 smallest quantization errors
    assert torch.allclose(w.detach()[q.frozen], wq[q.frozen])  # stored value = alpha T
    assert set((w.detach()[q.frozen] / alpha).round().tolist()) <= {-1.0, 0.0, 1.0}
    y = q(w)
    y.backward(torch.ones(8))
    assert torch.equal(w.grad, (~q.frozen).float())  # frozen weights get no gradient
    assert torch.equal(y.detach()[~q.frozen], w.detach()[~q.frozen])


def test_loss_aware_importance_prefers_small_gradient_times_error():
    w = torch.nn.Parameter(torch.tensor([0.9, 0.7, 0.3, -0.5]))
    q = ELQWeightQuantizer(1, criterion="loss")
    q.init_scale(w)  # alpha = 0.6: errors 0.3, 0.1, 0.3, 0.1
    q.grad_avg.copy_(torch.tensor([0.01, 5.0, 0.02, 1.0]))  # |g * err| = 0.003, 0.5, 0.006, 0.1
    q.freeze_fraction(w, 0.5)
    assert q.frozen.tolist() == [True, False, True, False]


def test_frozen_weights_never_move_under_sgd_with_momentum_and_decay():
    torch.manual_seed(0)
    lin = torch.nn.Linear(20, 5, bias=False)
    q = ELQWeightQuantizer(2, criterion="error")
    q.init_scale(lin.weight)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for frac in (0.5, 0.75, 0.875, 1.0):
        q.freeze_fraction(lin.weight, frac)
        assert float(q.frozen.float().mean()) == pytest.approx(frac, abs=0.01)
        snapshot = lin.weight.detach()[q.frozen].clone()
        for _ in range(3):
            opt.zero_grad()
            x = torch.randn(8, 20)
            out = torch.nn.functional.linear(x, q(lin.weight))
            (out.pow(2).mean() + 1e-3 * elq_penalty_stub(lin, q)).backward()
            opt.step()
            q.restore(lin.weight.data)
            assert torch.equal(lin.weight.detach()[q.frozen], snapshot)
    assert bool(q.frozen.all())
    vals = set((q(lin.weight).detach() / q.alpha).round(decimals=5).unique().tolist())
    assert vals <= {-1.0, 0.0, 1.0}


def elq_penalty_stub(lin, q):
    holder = torch.nn.Module()
    holder.layer = lin
    lin.weight_quant = q
    try:
        return elq_penalty(holder)
    finally:
        del lin.weight_quant


def test_options_validation():
    with pytest.raises(ValueError, match="schedule"):
        ELQOptions(schedule=[0.5, 0.9])
    with pytest.raises(ValueError, match="criterion"):
        ELQOptions(criterion="random")
    with pytest.raises(ValueError, match="w_bits"):
        ELQWeightQuantizer(3)


def test_fused_kernels_match_eager():
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 32, 3, 3) * 0.1)
    q = ELQWeightQuantizer(2, criterion="error")
    q.init_scale(w)
    q.freeze_fraction(w, 0.5)
    assert_fused_matches(q, w.detach(), kernel_names=("_elq_forward", "_elq_backward"))

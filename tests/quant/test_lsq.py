"""LSQ: forward on the grid, the step gradient of eq. 3 with g = 1/sqrt(N Q_P), initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcnn.methods import calibrate, quantize
from qcnn.quant.lsq import LSQQuantizer, lsq, lsq_range
from qcnn.recipes import Recipe


def test_ranges():
    assert lsq_range(3, True) == (4, 3) and lsq_range(3, False) == (0, 7)
    with pytest.raises(ValueError, match="bits=1"):
        lsq_range(1, True)


def test_forward_and_gradients_hand_computed():
    x = torch.tensor([-3.0, -0.6, 0.2, 0.74, 2.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = lsq(x, s, 3, signed=True)  # Q_N = 4, Q_P = 3; v = [-6, -1.2, 0.4, 1.48, 4]
    assert torch.allclose(y, torch.tensor([-4.0, -1.0, 0.0, 1.0, 3.0]) * 0.5)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y.backward(g)
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))
    # ds: -Q_N below, round(v) - v inside, Q_P above; times g = 1/sqrt(N Q_P) with N = 5
    ds = 1 * -4 + 2 * (-1 + 1.2) + 3 * (0 - 0.4) + 4 * (1 - 1.48) + 5 * 3
    assert math.isclose(float(s.grad), ds / math.sqrt(5 * 3), rel_tol=1e-5)


def test_activation_grad_scale_counts_features_per_sample():
    q = LSQQuantizer(2, signed=False)  # Q_P = 3
    with torch.no_grad():
        q.step.fill_(0.25)
    q.initialized.fill_(True)
    x = torch.rand(4, 2, 3, 3) * 2
    q(x).sum().backward()
    v = x / 0.25
    ref = torch.where(v > 3, torch.tensor(3.0), torch.round(v) - v).sum() / math.sqrt(18 * 3)
    assert math.isclose(float(q.step.grad), float(ref), rel_tol=1e-5)


def test_per_channel_weights_init_and_gradient_shape():
    w = torch.tensor([[0.1, -0.3], [1.0, 2.0]], requires_grad=True)
    q = LSQQuantizer(4, signed=True, per_channel=True, activation=False, init=w)
    assert torch.allclose(q.step.detach(), torch.tensor([0.4, 3.0]) / math.sqrt(7))  # 2 mean|w| / sqrt(Q_P)
    q(w).sum().backward()
    assert q.step.grad.shape == (2,)
    g = q.grid()
    assert g.axis == 0 and (g.qmin, g.qmax) == (-8, 7)


def test_activation_init_from_calibration_and_use_before_init():
    q = LSQQuantizer(4, signed=False)
    with pytest.raises(RuntimeError, match="calibration"):
        q(torch.ones(2, 3))
    q.observing = True
    q(torch.full((2, 3), 2.0))
    q(torch.full((2, 3), 4.0))
    q.observing = False
    q.finish_calibration()
    assert math.isclose(float(q.step.detach()), 2 * 3.0 / math.sqrt(15), rel_tol=1e-6)
    y = q(torch.tensor([[0.0, 1.0, 100.0]]))
    assert float(y[0, 2].detach()) == pytest.approx(15 * float(q.step.detach()))


def test_method_state_dict_round_trip():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    recipe = Recipe(method="lsq", w_bits=3, a_bits=3, per_channel=False)
    q = quantize(net, recipe)
    x = torch.randn(3, 1, 6, 6)
    calibrate(q, [(x, None)])
    assert isinstance(q.get_submodule("0").input_quant, LSQQuantizer) and q.get_submodule("0").input_quant.bits == 8
    assert q.get_submodule("2").input_quant.qn == 0  # after ReLU: unsigned
    q.eval()
    q2 = quantize(net, recipe)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.eval()(x), q(x))


def test_mse_init_weights_and_activations():
    """LSQ+ initialisation: the weight step is the MSE-optimal one (fewer zeros than 2 mean|w| at 2 bits),
    the activation step minimises the calibration data's quantization error on its geometric grid."""
    from qcnn.calib import calibrating
    from qcnn.quant.lsq import mse_step_geometric
    from qcnn.quant.uniform import mse_scale

    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    paper = LSQQuantizer(2, True, activation=False, init=w)
    mse = LSQQuantizer(2, True, activation=False, init=w, init_rule="mse")
    assert torch.equal(mse.step.detach(), mse_scale(w, -2, 1))
    assert ((mse(w) - w) ** 2).sum() < ((paper(w) - w) ** 2).sum()
    assert (mse(w) == 0).float().mean() < (paper(w) == 0).float().mean() - 0.1

    x = torch.relu(torch.randn(4, 8, 16, 16))
    a = LSQQuantizer(2, False, init_rule="mse")
    with calibrating(a):
        a(x)
    s = float(a.step)
    assert s == pytest.approx(float(mse_step_geometric(x, 0, 3)))
    grid = torch.logspace(-4, 0, 161) * x.max() / 3
    errs = torch.stack([((x / g).clamp(0, 3).round() * g - x).pow(2).mean() for g in grid])
    assert ((x / s).clamp(0, 3).round() * s - x).pow(2).mean() <= errs.min() + 1e-7
    with pytest.raises(ValueError, match="'paper' or 'mse'"):
        LSQQuantizer(2, True, init_rule="max")


def test_a_step_carried_across_zero_acts_as_its_magnitude():
    """An optimizer update took LeNet-5's 8-bit conv1 weight step from 0.003 to -0.005; the forward clamped it
    to EPS while the backward still used the clamped-away region, and the next update threw it to 32.8 (all
    weights 0, the cell at 10 %). The grid now uses |s| and the gradient carries sign(s)."""
    from qcnn.quant.lsq import lsq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g)
    for s0 in (0.05, -0.05):
        s = torch.tensor(s0, requires_grad=True)
        y = lsq(x, s, 4, True)
        ref = torch.clamp(torch.round(x / 0.05), -8, 7) * 0.05
        assert torch.allclose(y, ref)
        (gs,) = torch.autograd.grad(y.pow(2).sum(), s)
        sp = torch.tensor(0.05, requires_grad=True)
        (gp,) = torch.autograd.grad(lsq(x, sp, 4, True).pow(2).sum(), sp)
        assert torch.allclose(gs, gp if s0 > 0 else -gp) and float(gp) != 0


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_kernels_match_eager(per_channel):
    """Fused forward and input gradient equal the eager ones bit for bit, the step gradient to rounding
    (weights per tensor / per channel, including a negative step; unsigned activations)."""
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.1
    q = LSQQuantizer(4, signed=True, per_channel=per_channel, activation=False, init=w)
    with torch.no_grad():
        q.step.neg_() if not per_channel else q.step[::3].neg_()
    assert_fused_matches(q, w, kernel_names=("_lsq_forward", "_lsq_backward"))
    if not per_channel:
        a = LSQQuantizer(3, signed=False)
        with torch.no_grad():
            a.step.fill_(0.2)
        a.initialized.fill_(True)
        x = torch.randn(4, 16, 16, 16).relu()
        assert_fused_matches(a, x, kernel_names=("_lsq_forward", "_lsq_backward"))


def test_step_lr_puts_the_steps_in_their_own_group():
    from qcnn.methods.lsq import LSQMethod

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    q = quantize(net, Recipe(method="lsq", w_bits=8, a_bits=8, first_last="same"))
    assert LSQMethod(LSQMethod.make_options({})).param_groups(q, 1e-3) is None
    groups = LSQMethod(LSQMethod.make_options({"step_lr": 1e-5})).param_groups(q, 1e-3)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == len(list(q.parameters()))
    for name, p in q.named_parameters():
        g = by_id[id(p)]
        if name.endswith("step"):
            assert g["lr"] == 1e-5 and g["weight_decay"] == 0.0, name
        else:
            assert "lr" not in g and g["weight_decay"] == (1e-3 if p.ndim >= 2 else 0.0), name


def test_adam_moves_each_step_by_about_lr_whatever_its_size_unless_step_lr(fashion_dir):
    """The paper's gradient scale 1/sqrt(N Q_P) is made for SGD; Adam divides it out, so an 8-bit weight step
    (below 1e-3 here) moves by about lr = 5e-4 per update, several times its size over 5 updates; ``step_lr``
    bounds that move."""
    from qcnn.data import get_data
    from qcnn.methods.lsq import LSQMethod
    from qcnn.models import build_model
    from qcnn.recipes import TrainSpec
    from qcnn.train import default_param_groups, make_default_optimizer

    b = get_data("fashion-mnist", fashion_dir, batch_size=128, augment=False, calib_size=256)
    spec = TrainSpec(optimizer="adamw", lr=5e-4, weight_decay=0.0)
    moves = {}
    for step_lr in (None, 1e-6):
        torch.manual_seed(0)
        q = quantize(build_model("lenet5", in_channels=1), Recipe(method="lsq", w_bits=8, a_bits=8,
                                                                  first_last="same", params={"init": "mse"}))
        calibrate(q, b.calib, 256)
        groups = LSQMethod(LSQMethod.make_options({"step_lr": step_lr})).param_groups(q, 0.0)
        opt = make_default_optimizer(groups or default_param_groups(q, 0.0), spec)
        w_steps = [m.step for name, m in q.named_modules() if isinstance(m, LSQQuantizer) and "weight" in name]
        s0 = torch.stack([s.detach().abs().max() for s in w_steps])
        before = [s.detach().clone() for s in w_steps]
        q.train()
        for i, (x, y) in enumerate(b.train):
            if i == 5:
                break
            opt.zero_grad()
            torch.nn.functional.cross_entropy(q(x), y).backward()
            opt.step()
        moved = torch.stack([(s.detach() - s1).abs().max() for s, s1 in zip(w_steps, before)])
        moves[step_lr] = float((moved / s0).max())
    assert moves[None] > 0.5, moves  # measured 6.1: 5 updates of ~lr each against steps below 1e-3
    assert moves[1e-6] < 0.05 * moves[None], moves  # measured 0.011

"""VNQ: KL approximation at hand-computed points, nearest-mode KL, local reparameterisation, snapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qcnn.methods.vnq import prune_and_snap
from qcnn.nn.layers import QLinear
from qcnn.nn.vnq import VNQLinear
from qcnn.quant.vnq import K1, VNQQuantizer, neg_kl, ternary_r
from qcnn.transform import to_variational


def _hand_neg_kl(la: float) -> float:
    return 0.63576 / (1 + math.exp(-(1.87320 + 1.48695 * la))) - 0.5 * math.log(1 + math.exp(-la))


def test_neg_kl_at_known_points():
    la = torch.tensor([0.0, 2.0, -2.0])
    # k1 sigmoid(k2) - 0.5 log 2 = 0.204521..., and the two other points worked out the same way
    assert neg_kl(la).tolist() == pytest.approx([0.2045210, 0.5673435, -0.9047727], abs=1e-6)
    for v in (-5.0, 0.5, 7.0):
        assert float(neg_kl(torch.tensor(v))) == pytest.approx(_hand_neg_kl(v), abs=1e-6)
    # KL -> 0 as alpha -> inf (with the constant k1)
    assert float(K1 - neg_kl(torch.tensor(30.0))) == pytest.approx(0.0, abs=1e-6)


def test_kl_is_taken_around_the_nearest_codebook_value():
    w = torch.tensor([0.1, 0.45, -0.3])
    q = VNQQuantizer(w, log_sigma2_init=math.log(0.01), learn_r=False)
    q.r.fill_(0.5)
    # nearest modes 0, +0.5, -0.5: distances 0.1, 0.05, 0.2
    expect = sum(K1 - _hand_neg_kl(math.log(0.01) - math.log(d * d)) for d in (0.1, 0.05, 0.2))
    assert float(q.kl(w).detach()) == pytest.approx(expect, rel=1e-5)


def test_kl_gradient_pulls_towards_the_mode_and_raises_sigma():
    w = torch.tensor([0.4], requires_grad=True)
    q = VNQQuantizer(w, log_sigma2_init=-6.0, learn_r=False)
    q.r.fill_(0.5)
    q.kl(w).backward()
    assert float(w.grad) < 0  # decreasing the KL moves theta up, towards r = 0.5
    assert float(q.log_sigma2.grad) < 0  # and grows sigma


def test_ternary_init_of_r():
    w = torch.tensor([0.1, -0.1, 1.0, -2.0])
    # mean|w| = 0.8, delta = 0.56, r = mean(1, 2)
    assert float(ternary_r(w)) == pytest.approx(1.5)


def test_snap_prunes_by_log_alpha_and_ternarises():
    w = torch.tensor([0.3, -0.6, 0.02, 0.9, -0.2])
    q = VNQQuantizer(w, log_sigma2_init=math.log(1e-4), learn_r=False)
    q.r.fill_(0.5)
    q.log_sigma2.data[1] = math.log(10.0)  # log alpha = log(10 / 0.36) > 2: pruned
    out = q.snap(w)
    assert out.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5, 0.0])


def test_local_reparameterisation_moments():
    torch.manual_seed(0)
    lin = QLinear.from_float(nn.Linear(3, 2), weight_quant=None)
    lin.weight_quant = VNQQuantizer(lin.weight, log_sigma2_init=math.log(0.04))
    lin = VNQLinear.from_float(lin, None, lin.weight_quant, None)
    x = torch.tensor([[1.0, -2.0, 0.5]]).expand(20000, 3)
    with torch.no_grad():
        y = lin.train()(x)
        mean_y = lin.eval()(x[:1])
    assert torch.allclose(y.mean(0), mean_y[0], atol=0.02)
    # Var = sum_i x_i^2 sigma_i^2 = 0.04 * (1 + 4 + 0.25)
    assert torch.allclose(y.var(0), torch.full((2,), 0.21), rtol=0.05)


def test_to_variational_and_prune_and_snap_give_ternary_layers():
    from qcnn.methods import quantize
    from qcnn.models import build_model
    from qcnn.recipes import Recipe

    q = to_variational(quantize(build_model("lenet5", in_channels=1),
                                Recipe.from_dict({"method": "vnq", "w_bits": 2, "a_bits": None, "first_last": "same"})))
    assert isinstance(q.fc1, VNQLinear)
    loss = q.train()(torch.randn(4, 1, 28, 28)).sum()
    loss.backward()
    assert q.fc1.weight_quant.log_sigma2.grad.abs().sum() > 0
    stats = prune_and_snap(q)
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        m = q.get_submodule(name)
        r = m.weight_quant.r.abs()
        assert torch.isin(m.weight, torch.stack([-r, torch.zeros_like(r), r]).detach()).all()
        assert 0.0 <= stats[name]["zero_fraction"] <= 1.0


def test_prune_and_snap_level_fractions():
    lin = QLinear.from_float(nn.Linear(4, 2, bias=False), weight_quant=None)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.6, 0.02, 0.9], [-0.2, -0.45, 0.7, 0.1]]))
    lin.weight_quant = VNQQuantizer(lin.weight, log_sigma2_init=math.log(1e-4), learn_r=False)
    lin.weight_quant.r.fill_(0.5)
    lin.weight_quant.log_sigma2.data[0, 1] = math.log(10.0)  # -0.6 pruned by log alpha
    model = nn.Sequential(lin)
    stats = prune_and_snap(model)["0"]
    # nearest values, -0.6 pruned by the threshold: [0.5, 0, 0, 0.5] and [0, -0.5, 0.5, 0]
    assert model[0].weight.flatten().tolist() == pytest.approx([0.5, 0.0, 0.0, 0.5, 0.0, -0.5, 0.5, 0.0])
    fractions = (stats["zero_fraction"], stats["neg_fraction"], stats["pos_fraction"])
    assert fractions == pytest.approx((4 / 8, 1 / 8, 3 / 8))
    # 0.02 (log alpha = log(1e-4 / 4e-4) < 2), -0.2 and 0.1 are zeros as nearest values, not by the threshold
    assert stats["pruned_fraction"] == pytest.approx(1 / 8)


def test_clip_theta_step_hook():
    from qcnn.methods.base import get_method

    lin = QLinear.from_float(nn.Linear(4, 1, bias=False), weight_quant=None)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.9, -0.7, 0.2, -0.1]]))
    lin.weight_quant = VNQQuantizer(lin.weight, learn_r=False)
    lin.weight_quant.r.fill_(0.5)
    model = nn.Sequential(lin)
    get_method("vnq", {"clip_theta": False}).step_hook(model, 1)
    assert model[0].weight.flatten().tolist() == pytest.approx([0.9, -0.7, 0.2, -0.1])
    get_method("vnq", {"clip_theta": True}).step_hook(model, 1)
    assert model[0].weight.flatten().tolist() == pytest.approx([0.5, -0.5, 0.2, -0.1])

"""PACT: forward on the exact grid, both gradients against the paper's rule, alpha's optimiser group."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qcnn.methods import calibrate, quantize
from qcnn.methods.pact import PACTMethod
from qcnn.quant.dorefa import DoReFaWeight
from qcnn.quant.pact import PACTQuantizer, pact
from qcnn.recipes import Recipe


def test_unsigned_forward_and_gradients():
    x = torch.tensor([-1.0, 0.3, 1.0, 1.9, 2.0, 2.5], requires_grad=True)
    alpha = torch.tensor(2.0, requires_grad=True)
    y = pact(x, alpha, 2)  # n = 3, step 2/3
    # clip -> [0, .3, 1, 1.9, 2, 2]; * 3/2 -> [0, .45, 1.5, 2.85, 3, 3]; round -> [0, 0, 2, 3, 3, 3]
    assert torch.allclose(y, torch.tensor([0, 0, 2, 3, 3, 3]) * 2 / 3)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0]))  # 1 on [0, alpha)
    assert float(alpha.grad) == 11.0  # x >= alpha: 5 + 6


def test_signed_forward_and_gradients():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.2, 0.9, 1.2], requires_grad=True)
    alpha = torch.tensor(1.0, requires_grad=True)
    y = pact(x, alpha, 3, signed=True)  # n = 3 on [-1, 1]
    assert torch.allclose(y, torch.tensor([-3.0, -3.0, -2.0, 1.0, 3.0, 3.0]) / 3)  # round(-1.5) = -2
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y.backward(g)
    assert torch.equal(x.grad, torch.tensor([0.0, 0.0, 3.0, 4.0, 5.0, 0.0]))
    assert float(alpha.grad) == -1.0 - 2.0 + 6.0  # -1 where x <= -alpha, +1 where x >= alpha


def test_signed_one_bit():
    x = torch.tensor([-2.0, -0.1, 0.0, 0.4, 3.0], requires_grad=True)
    alpha = torch.tensor(0.5, requires_grad=True)
    y = pact(x, alpha, 1, signed=True)
    assert torch.equal(y, torch.tensor([-0.5, -0.5, 0.5, 0.5, 0.5]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert float(alpha.grad) == 0.0  # -1 + 1


def test_levels_grid_and_alpha_floor():
    q = PACTQuantizer(3, alpha_init=4.0)
    y = q(torch.linspace(-2, 6, 1001))
    assert y.unique().numel() == 8
    g = q.grid()
    assert (g.qmin, g.qmax) == (0, 7) and math.isclose(float(g.scale), 4 / 7, rel_tol=1e-6)
    assert torch.allclose(g.from_codes(g.to_codes(y)), y, atol=1e-5)
    with torch.no_grad():
        q.alpha.fill_(-1.0)
    assert torch.isfinite(q(torch.randn(100))).all()


def test_init_percentile_from_calibration():
    q = PACTQuantizer(4, init_percentile=50.0)
    x = torch.arange(0.0, 101.0)
    q.observing = True
    assert torch.equal(q(x), x)
    q.observing = False
    q.finish_calibration()
    assert math.isclose(float(q.alpha.detach()), 50.0, rel_tol=1e-6)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = self.conv2(x)  # no ReLU: conv3 consumes a signed feature map
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def test_method_signed_variant_dorefa_weights_and_param_groups():
    torch.manual_seed(0)
    q = quantize(_Net(), Recipe(method="pact", w_bits=4, a_bits=4, params={"alpha_decay": 1e-3, "init_mse": False}))
    calibrate(q, [(torch.randn(4, 1, 6, 6), None)])
    assert isinstance(q.conv2.input_quant, PACTQuantizer) and not q.conv2.input_quant.signed
    assert q.conv3.input_quant.signed
    assert isinstance(q.conv2.weight_quant, DoReFaWeight)
    assert float(q.conv2.input_quant.alpha.detach()) == 10.0
    groups = PACTMethod(PACTMethod.make_options({"alpha_decay": 1e-3})).param_groups(q, 5e-4)
    alpha_ids = {id(q.conv2.input_quant.alpha), id(q.conv3.input_quant.alpha)}
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay[1e-3] == alpha_ids
    assert not any(alpha_ids & ids for d, ids in by_decay.items() if d != 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(q.parameters()))


def test_state_dict_round_trip_with_learned_alpha():
    torch.manual_seed(0)
    recipe = Recipe(method="pact", w_bits=2, a_bits=2)
    q = quantize(_Net(), recipe)
    x = torch.randn(4, 1, 6, 6)
    calibrate(q, [(x, None)])
    with torch.no_grad():
        q.conv2.input_quant.alpha.fill_(1.7)
    q.eval()
    q2 = quantize(_Net(), recipe)
    q2.load_state_dict(q.state_dict())
    assert math.isclose(float(q2.conv2.input_quant.alpha.detach()), 1.7, rel_tol=1e-6)
    assert torch.equal(q2.eval()(x), q(x))


def test_init_mse_picks_the_error_minimising_alpha():
    torch.manual_seed(0)
    x = torch.randn(20000).clamp_min(0)
    q = PACTQuantizer(2, init_mse=True)
    q.observing = True
    q(x)
    q.observing = False
    q.finish_calibration()
    a = float(q.alpha.detach())
    err = lambda v: float((pact(x, torch.tensor(v), 2) - x).pow(2).mean())
    assert 0.5 < a < 3.0  # far below max|x| (about 4) at 2 bits
    assert err(a) <= min(err(0.5 * a), err(1.5 * a), err(float(x.max())))


def test_param_groups_decay_kernels_only_and_alpha_with_its_own_l2():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    q = quantize(net, Recipe(method="pact", w_bits=4, a_bits=4, first_last="same",
                             params={"alpha_decay": 3e-4, "alpha_lr": 0.5}))
    groups = PACTMethod(PACTMethod.make_options({"alpha_decay": 3e-4, "alpha_lr": 0.5})).param_groups(q, 1e-3)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(by_id) == len(list(q.parameters()))
    for name, p in q.named_parameters():
        g = by_id[id(p)]
        if name.endswith("alpha"):
            assert g["weight_decay"] == 3e-4 and g["lr"] == 0.5, name
        elif p.ndim >= 2:
            assert g["weight_decay"] == 1e-3, name
        else:  # BatchNorm parameters and biases are never decayed
            assert g["weight_decay"] == 0.0 and "lr" not in g, name


def test_alpha_moves_under_the_recipe_optimiser_on_real_data(fashion_dir):
    """With the recipe's momentum SGD, alpha travels far more than Adam's lr-bounded steps allowed
    (at most 5e-4 per step with the old recipe: 0.01 over these 20 steps)."""
    from qcnn.data import get_data
    from qcnn.models import build_model
    from qcnn.recipes import load_recipe
    from qcnn.train import make_default_optimizer

    torch.manual_seed(0)
    b = get_data("fashion-mnist", fashion_dir, batch_size=128, augment=False, calib_size=256)
    recipe = load_recipe("pact").replace(w_bits=2, a_bits=2, first_last="8bit", calib_images=256)
    assert recipe.train.optimizer == "sgd" and recipe.train.momentum > 0
    q = quantize(build_model("lenet5", in_channels=1), recipe)
    calibrate(q, b.calib, 256, bn_train=True)
    method = PACTMethod(PACTMethod.make_options(recipe.params))
    opt = make_default_optimizer(method.param_groups(q, recipe.train.weight_decay), recipe.train)
    alphas = [m.alpha for m in q.modules() if isinstance(m, PACTQuantizer)]
    a0 = torch.stack([a.detach().clone() for a in alphas])
    q.train()
    for i, (x, y) in enumerate(b.train):
        if i == 20:
            break
        opt.zero_grad()
        F.cross_entropy(q(x), y).backward()
        opt.step()
    moved = (torch.stack([a.detach() for a in alphas]) - a0).abs().max()
    assert moved > 2 * 20 * 5e-4, float(moved)  # measured 0.032


def test_fused_kernels_match_eager():
    """Fused kernels (unsigned, signed, 1-bit signed): forward and dx bit for bit, alpha's grad to rounding."""
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    x = torch.randn(4, 16, 16, 16) * 2
    assert_fused_matches(PACTQuantizer(4, alpha_init=3.0), x, kernel_names=("_pact_forward", "_pact_backward"))
    assert_fused_matches(PACTQuantizer(3, signed=True, alpha_init=2.5), x,
                         kernel_names=("_pact_forward", "_pact_backward"))
    assert_fused_matches(PACTQuantizer(1, signed=True, alpha_init=2.5), x,
                         kernel_names=("_pact_sign_forward", "_pact_sign_backward"))


def test_eager_pact_keeps_the_plain_numerics():
    """Regression: eagerly the output is ``round(clip(x, 0, a) (n / a)) (a / n)`` and alpha's gradient the float32
    ``sum g [x >= a]`` (``- sum g [x <= -a]`` signed), exactly (the fused kernel's sum may differ by rounding)."""
    torch.manual_seed(1)
    x = torch.randn(8, 16, 32, 32) * 2
    g = torch.randn_like(x)
    for signed in (False, True):
        q = PACTQuantizer(4, signed=signed, alpha_init=2.5)
        xg = x.clone().requires_grad_(True)
        y = q(xg)
        y.backward(g)
        a = torch.tensor(2.5)
        n = 2 ** (3 if signed else 4) - 1
        lo = -a if signed else torch.zeros(())
        assert torch.equal(y, torch.round(torch.minimum(torch.maximum(x, lo), a) * (n / a)) * (a / n))
        ga = (g * ((x >= a).float() - (x <= -a).float())).sum() if signed else (g * (x >= a).float()).sum()
        assert torch.equal(q.alpha.grad, ga)
        inside = (x > -a) & (x < a) if signed else (x >= 0) & (x < a)
        assert torch.equal(xg.grad, g * inside.float())

"""HWGQ BatchNorm placement (official Caffe code: no Scale on a BN in front of a Quant layer, Scale on
branch-end / classifier BNs) and the scaled levels for inputs that are not a normalised BN output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.methods.hwgq import normalized_inputs
from qcnn.models import build_model
from qcnn.quant.hwgq import HWGQActivation
from qcnn.recipes import Recipe

RECIPE = "recipes/hwgq.yaml"
BLOCKS = [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)]


def _bns(model: nn.Module) -> dict[str, bool]:
    return {n: m.affine for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _hwgq(model: nn.Module) -> dict[str, bool]:
    """layer -> whether its HWGQ input quantizer takes the N(0, 1) levels as they are."""
    return {n: m.input_quant.normalized for n, m in model.named_modules()
            if isinstance(getattr(m, "input_quant", None), HWGQActivation)}


def test_resnet20_keeps_affine_exactly_on_branch_end_bns():
    torch.manual_seed(0)
    q = quantize(build_model("resnet20"), Recipe.from_yaml(RECIPE))
    bns = _bns(q)
    assert len(bns) == 19
    # branch ends (bn2, in front of the residual add) keep gamma/beta: official scale*_branch2b_end
    assert {n for n, a in bns.items() if a} == {f"{b}.bn2" for b in BLOCKS}
    # BNs feeding an HWGQ quantizer through ReLU are normalisation only (the stem bn1 also feeds the first
    # shortcut, as bn1 of the official ResNet-18 does)
    assert {n for n, a in bns.items() if not a} == {"bn1"} | {f"{b}.bn1" for b in BLOCKS}
    sd = q.state_dict()
    assert "layer1.0.bn1.weight" not in sd and "bn1.bias" not in sd and "layer1.0.bn1.running_var" in sd
    assert "layer3.2.bn2.weight" in sd and "layer3.2.bn2.bias" in sd
    # fixed N(0, 1) levels only on normalised inputs; after a residual add + ReLU the levels are scaled
    hw = _hwgq(q)
    assert {n for n, v in hw.items() if v} == {f"{b}.conv2" for b in BLOCKS} | {"layer1.0.conv1"}
    assert {n for n, v in hw.items() if not v} == {f"{b}.conv1" for b in BLOCKS[1:]}
    assert "linear" not in hw and "conv1" not in hw  # 8-bit uniform first / last layers


def test_lenet5_placement_max_pool_commutes_with_the_quantizer():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, 8)
    a = HWGQActivation(2)
    assert torch.equal(a(F.max_pool2d(F.relu(x), 2)), F.max_pool2d(a(x), 2))  # so max-pool keeps N(0, 1)
    assert not torch.equal(a(F.avg_pool2d(x, 2)), F.avg_pool2d(a(x), 2))  # average pooling does not
    q = quantize(build_model("lenet5", in_channels=1), Recipe.from_yaml(RECIPE))
    assert _bns(q) == {"bn1": False, "bn2": False}
    assert _hwgq(q) == {"conv2": True, "fc1": True, "fc2": False}  # fc1 -> ReLU -> fc2 has no BN


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 9, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.avg_pool2d(F.relu(self.bn2(self.conv2(x))), 2)  # average pooling: not a normalised input
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_max_pool2d(x, 3), 1))


def test_bn_affine_modes_and_overrides():
    assert normalized_inputs(_Net()) == {"conv2": "bn1"}  # adaptive max pool is not followed through
    base = dict(method="hwgq", w_bits=1, a_bits=2)
    auto = quantize(_Net(), Recipe(**base))
    assert _bns(auto) == {"bn1": False, "bn2": True, "bn3": True}
    assert _hwgq(auto) == {"conv2": True, "conv3": False}
    off = quantize(_Net(), Recipe(**base, params={"bn_affine": False}))
    assert not any(_bns(off).values()) and _hwgq(off) == {"conv2": True, "conv3": False}
    on = quantize(_Net(), Recipe(**base, params={"bn_affine": True}))
    assert all(_bns(on).values()) and _hwgq(on) == {"conv2": False, "conv3": False}
    skipped = quantize(_Net(), Recipe(**base, overrides=[{"pattern": "conv2", "skip": True}]))
    assert _bns(skipped)["bn1"]  # a float conv2 has no HWGQ quantizer: its BN keeps gamma/beta
    with pytest.raises(ValueError, match="bn_affine"):
        quantize(_Net(), Recipe(**base, params={"bn_affine": "sometimes"}))


def test_scaled_levels_for_inputs_that_are_not_normalised():
    torch.manual_seed(0)
    s = 3.0
    q = HWGQActivation(2, normalized=False)
    with pytest.raises(RuntimeError, match="calibration"):
        q.eval()(torch.rand(10))
    with calibrating(q):
        q(F.relu(s * torch.randn(200000)))  # the half-wave of N(0, 9)
    assert float(q.sigma) == pytest.approx(s, rel=0.01)  # sqrt(E[x^2 | x > 0])
    x = torch.linspace(-2, 8, 1001, requires_grad=True)
    y = q(x)
    sig = float(q.sigma)
    ref = sig * HWGQActivation(2)(x.detach() / sig)
    assert torch.allclose(y, ref)
    assert set(y.unique().tolist()) <= {0.0, *(sig * torch.tensor([0.538, 1.076, 1.614])).tolist()}
    y.sum().backward()  # clipped ReLU on (0, s q_L]
    assert torch.equal(x.grad, ((x > 0) & (x <= sig * 1.614)).float())
    g = q.grid()
    assert math.isclose(float(g.scale), 0.538 * sig, rel_tol=1e-6) and (g.qmin, g.qmax) == (0, 3)
    gl = HWGQActivation(2, "lloyd", normalized=False)
    with calibrating(gl):
        gl(F.relu(s * torch.randn(1000)))
    assert torch.allclose(gl.grid().levels, torch.tensor([0.0, 0.318, 1.0, 1.894]) * gl.sigma)
    # training: EMA (momentum 0.1) towards the batch value; eval: fixed
    q.train()
    for _ in range(60):
        q(F.relu(torch.randn(10000)))
    assert float(q.sigma) == pytest.approx(1.0, abs=0.02)
    q.eval()
    q(F.relu(5 * torch.randn(10000)))
    assert float(q.sigma) == pytest.approx(1.0, abs=0.02)
    q2 = HWGQActivation(2, normalized=False)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.sigma, q.sigma) and q2.is_initialized()
    assert set(HWGQActivation(2).state_dict()) == {"levels", "thresholds"}  # normalised: nothing to calibrate
    legacy = HWGQActivation(2, normalized=False)  # a state saved before the scale existed: s = 1
    legacy.load_state_dict(HWGQActivation(2).state_dict())
    assert float(legacy.sigma) == 1.0 and legacy.is_initialized()


def test_resnet20_hwgq_trains_on_cifar10(cifar_zip, weights_dir):
    """Real data smoke: ResNet-20 from the shipped float weights with the hwgq recipe fits one CIFAR-10 batch
    (gradients reach every layer through the normalised and the scaled quantizers)."""
    from qcnn.data import get_data
    from qcnn.methods import calibrate
    from qcnn.models import load_weights

    torch.manual_seed(0)
    b = get_data("cifar10", cifar_zip, batch_size=32, augment=False)
    x, y = next(iter(b.train))
    model = load_weights(build_model("resnet20"), weights_dir / "resnet20-12fca82f.th")
    q = quantize(model, Recipe.from_yaml(RECIPE))
    calibrate(q, b.calib.take(128))
    scaled = [m for m in q.modules() if isinstance(m, HWGQActivation) and not m.normalized]
    assert len(scaled) == 8 and all(m.is_initialized() and 0 < float(m.sigma) < 100 for m in scaled)
    gamma0 = q.get_submodule("layer2.0.bn2").weight.detach().clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.02, momentum=0.9)
    q.train()
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not torch.equal(q.get_submodule("layer2.0.bn2").weight, gamma0)  # branch-end gamma trains

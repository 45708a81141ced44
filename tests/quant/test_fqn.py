"""FQN: asymmetric min/max weight grids, EMA activation ranges, folded BN with frozen statistics."""

from __future__ import annotations

import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.nn.layers import QConv2d, QConvBn2d, QLinear
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe
from qcnn.transform import fold_conv_bn


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = _Net().eval()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return net


RECIPE = {"method": "fqn", "w_bits": 4, "a_bits": 4, "first_last": "same", "per_channel": True}


def test_all_layers_quantized_with_asymmetric_grids():
    q = quantize(_net(), RECIPE)
    layers = [m for m in q.modules() if isinstance(m, (QConv2d, QLinear))]
    assert len(layers) == 3  # first and last included
    for m in layers:
        assert isinstance(m.weight_quant, UniformQuantizer) and not m.weight_quant.symmetric
        assert m.weight_quant.bits == 4 and m.input_quant.bits == 4
        assert m.input_quant.observer.name == "ema" and m.input_quant.track_in_training
    # BN folded into the convs by default (eval statistics): no BatchNorm left
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())


def test_weight_grid_is_per_channel_min_max():
    q = quantize(_net(), RECIPE)
    conv = q.conv2
    w = conv.weight.detach()
    wq = conv.quantized_weight()
    g = conv.weight_quant.grid()
    lo = w.flatten(1).min(1).values.clamp(max=0)
    hi = w.flatten(1).max(1).values.clamp(min=0)
    torch.testing.assert_close(g.scale, (hi - lo) / 15)
    torch.testing.assert_close(g.zero_point, (-8 - torch.round(lo / g.scale)).to(torch.int32))
    for c in range(4):  # 4-bit: at most 16 levels per channel, the extremes hit
        assert wq[c].unique().numel() <= 16
        assert torch.isclose(wq[c].max(), hi[c], atol=float(g.scale[c]) / 2)


def test_ema_activation_range_gamma():
    q = quantize(_net(), RECIPE).train()
    aq = q.fc.input_quant
    obs = aq.observer
    a = torch.randn(8, 3, 6, 6)
    b = 3 * torch.randn(8, 3, 6, 6)
    q(a)
    m1 = obs.max_val.clone()
    q(b)
    with torch.no_grad():
        feat = None

        def hook(mod, inp, out):
            nonlocal feat
            feat = inp[0]

        h = q.fc.register_forward_hook(hook)
        q.eval()
        q(b)
        h.remove()
    # second update: m <- 0.999 m + 0.001 max(batch)
    torch.testing.assert_close(obs.max_val, 0.999 * m1 + 0.001 * feat.max())


def test_qconvbn_folds_bn_with_frozen_stats_and_trains_unfolded():
    from qcnn.methods.fqn import prepare_fqn

    net = _net()
    q = prepare_fqn(net, Recipe.from_dict(RECIPE))
    cb = q.get_submodule("conv1")
    assert isinstance(cb, QConvBn2d)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad(), calibrating(q.eval()):
        q(x)
    # forward = conv with the quantized folded weight + folded bias
    sigma = torch.sqrt(net.bn1.running_var + net.bn1.eps)
    f = net.bn1.weight / sigma
    wf = net.conv1.weight * f.reshape(-1, 1, 1, 1)
    xin = cb.input_quant(x)
    want = nn.functional.conv2d(xin, cb.weight_quant(wf), net.bn1.bias - net.bn1.running_mean * f, padding=1)
    torch.testing.assert_close(cb(x), want)
    # training: running statistics frozen, gradients reach W, gamma, beta
    q.train()
    mean0 = cb.bn.running_mean.clone()
    loss = q(x).square().mean()
    loss.backward()
    assert torch.equal(cb.bn.running_mean, mean0)
    assert cb.weight.grad is not None and cb.weight.grad.abs().sum() > 0
    assert cb.bn.weight.grad.abs().sum() > 0 and cb.bn.bias.grad.abs().sum() > 0
    # folding gives the same function, and the structure quantize() builds for fqn (checkpoints reload)
    q.eval()
    from qcnn.integer import to_integer

    with torch.no_grad():
        before = q(x)
        int_before = to_integer(q, x)(x)  # the engine compiles QConvBn2d through its folded QConv2d
        fold_conv_bn(q)
        after = q(x)
    torch.testing.assert_close(before, after)
    assert torch.equal(int_before, to_integer(q, x)(x))
    fresh = quantize(_net(), RECIPE)
    assert set(fresh.state_dict()) == set(q.state_dict())


def test_mse_ranges_track_the_per_batch_mse_range_with_gamma():
    """``calib mse`` (recipe fqn_mse): calibrated with the MSE observer, then in training the range is the EMA
    (FQN's gamma) of each batch's MSE-optimal range, not of its max, so rare large values do not widen it."""
    import pytest

    from qcnn.quant.uniform import mse_range

    q = quantize(_net(), {**RECIPE, "calib": "mse"})
    aq = q.fc.input_quant
    assert aq.observer.name == "mse" and aq.track_mse and aq.tracker.gamma == 0.999
    torch.manual_seed(1)
    # leaky-ReLU features with a long tail (max 11.6): the MSE range clips the tail, min/max would not
    x = torch.nn.functional.leaky_relu(torch.distributions.Laplace(0.0, 1.0).sample((65536,)), 0.1)
    with calibrating(aq):
        aq(x)
    lo0, hi0 = aq.tracker.min_val.clone(), aq.tracker.max_val.clone()
    assert 3 < hi0 < 0.6 * x.max()  # measured 5.84 (histogram MSE threshold)
    aq.eval()
    sqnr = 10 * torch.log10(x.pow(2).mean() / (aq(x) - x).pow(2).mean())
    ema = quantize(_net(), RECIPE).fc.input_quant
    with calibrating(ema):
        ema(x)
    ema.eval()
    assert sqnr > 10 * torch.log10(x.pow(2).mean() / (ema(x) - x).pow(2).mean()) + 2  # measured 17.5 vs 14.2 dB
    aq.train()
    aq(x)
    blo, bhi = mse_range(x, 4, aq.signed, False)
    assert bhi < 0.5 * x.max()  # the batch's own MSE range: 5.46 here
    torch.testing.assert_close(aq.tracker.max_val, 0.999 * hi0 + 0.001 * bhi)
    torch.testing.assert_close(aq.tracker.min_val, 0.999 * lo0 + 0.001 * blo)
    with pytest.raises(ValueError, match="calib='percentile'"):
        quantize(_net(), {**RECIPE, "calib": "percentile"})

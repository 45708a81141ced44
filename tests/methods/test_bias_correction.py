"""Bias correction: the measured mean output error is removed (empirical), the clipped-normal means match
Monte Carlo, the analytic form follows the BatchNorm statistics, and held-out error drops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.methods.bias_correction import (
    analytic_bias_correction,
    clipped_normal_mean,
    empirical_bias_correction,
    ensure_biases,
    output_means,
)
from qcnn.recipes import Recipe
from qcnn.transform import float_twin

LAYERS = ["0", "3", "6", "11"]


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # a non-trivial affine part, as a trained network has
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 1.0)
            m.momentum = None  # running statistics: the equal-weight average over the batches below
    net.train()
    with torch.no_grad():  # statistics of the data the tests use, as a trained network's are of its data
        for x, _ in _batches():
            net(x)
    return net.eval()


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 3, 8, 8, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(n)]


def _qmodel(net, batches, w_bits=3):
    q = quantize(net, Recipe(method="uniform", w_bits=w_bits, a_bits=8, first_last="same", per_channel=False,
                             fold_bn=True)).eval()
    with torch.no_grad(), calibrating(q):
        for x, _ in batches:
            q(x)
    return q


def _mean_shift(q, twin, batches):
    ref = output_means(twin, LAYERS, batches)
    got = output_means(q, LAYERS, batches)
    return {n: float((got[n] - ref[n]).abs().max()) for n in LAYERS}


def test_empirical_correction_removes_the_measured_mean_output_error():
    net, batches = _net(), _batches()
    q = _qmodel(net, batches)
    twin = float_twin(q)
    before = _mean_shift(q, twin, batches)
    shifts = empirical_bias_correction(q, twin, batches)
    after = _mean_shift(q, twin, batches)
    assert set(shifts) == set(LAYERS)
    assert max(before.values()) > 0.05  # 3-bit per-tensor weights do shift the means
    for n in LAYERS:
        assert after[n] < 1e-4 + 1e-3 * before[n], (n, before[n], after[n])
        assert shifts[n] == pytest.approx(before[n], rel=1e-3) if n == "0" else True


def test_correction_lowers_held_out_error():
    net, calib, held = _net(), _batches(), _batches(seed=7)
    q = _qmodel(net, calib)
    twin = float_twin(q)
    x = torch.cat([b[0] for b in held])
    with torch.no_grad():
        ref = net(x)
        e0 = float(((q(x) - ref) ** 2).mean())
        empirical_bias_correction(q, twin, calib)
        e1 = float(((q(x) - ref) ** 2).mean())
    assert e1 < 0.9 * e0, (e0, e1)


def test_clipped_normal_means_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([-1.0, 0.0, 0.5, 3.0, 7.0], dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0, 2.0, 1.0], dtype=torch.float64)
    x = mu + sigma * torch.randn(400_000, 5, generator=g, dtype=torch.float64)
    for upper, sample in ((None, x), (float("inf"), x.clamp(min=0)), (6.0, x.clamp(0, 6))):
        torch.testing.assert_close(clipped_normal_mean(mu, sigma, upper), sample.mean(0), atol=1e-2, rtol=0)


def test_analytic_correction_follows_the_batchnorm_statistics():
    """With inputs that match the BN statistics (the float network's own data), the analytic correction of
    the layers fed by a BN'd conv removes most of their weight-induced mean shift."""
    net = _net()
    batches = _batches()
    q = _qmodel(net, batches)
    twin = float_twin(q)
    # isolate the weight error: activations unquantized, as the analytic form assumes
    for n in LAYERS:
        q.get_submodule(n).input_quant = None
    before = _mean_shift(q, twin, batches)
    how = analytic_bias_correction(q, net, batches)
    after = _mean_shift(q, twin, batches)
    assert how == {"0": "empirical", "3": "analytic", "6": "analytic", "11": "analytic"}  # fc: through the average pool
    # "3" is fed from BN + ReLU, "6" from BN + ReLU6, "11" through the average pool: E[x] is a clipped-normal
    # mean, exact only as far as the BN outputs are normal (measured: 85-86 % of the shift removed)
    assert after["0"] < 1e-4
    for n in ("3", "6"):
        assert after[n] < 0.3 * before[n], (n, before[n], after[n])


def test_ensure_biases_adds_zero_biases():
    q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(), nn.Linear(36, 2, bias=False)),
                 Recipe(method="uniform", first_last="same"))
    assert ensure_biases(q) == ["0", "2"]
    assert float(q.get_submodule("0").bias.detach().abs().sum()) == 0 and ensure_biases(q) == []

"""Non-uniform k-quantile quantizer: levels = quantiles of the fitted distribution; integer representation."""

from __future__ import annotations

import pytest
import torch

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.quant.nonuniform import (
    QuantileActQuantizer,
    QuantileWeightQuantizer,
    empirical_quantile_levels,
    gaussian_quantile_levels,
    integer_representation,
)
from qcnn.recipes import Recipe
from qcnn.report.levels import level_report


def test_gaussian_levels_are_normal_quantiles():
    normal = torch.distributions.Normal(0.0, 1.0)
    for bits in (1, 2, 3, 4):
        k = 2**bits
        lv, ed = gaussian_quantile_levels(bits)
        assert torch.allclose(lv, normal.icdf((torch.arange(k) + 0.5) / k), atol=1e-5)
        assert torch.allclose(ed, normal.icdf(torch.arange(1, k) / k), atol=1e-5)
    lv, _ = gaussian_quantile_levels(1)
    assert torch.allclose(lv, torch.tensor([-0.6745, 0.6745]), atol=1e-4)  # quartiles of N(0, 1)


def test_weight_quantizer_levels_match_fitted_normal_and_equal_mass():
    torch.manual_seed(0)
    w = 0.5 + 0.1 * torch.randn(200000)
    q = QuantileWeightQuantizer(2, int_bits=16, snap=False)
    y = q(w)
    mu, sd = w.mean(), w.std(unbiased=False)
    expect = mu + sd * torch.special.ndtri((torch.arange(4) + 0.5) / 4)
    assert torch.allclose(q.levels, expect, atol=1e-6)
    counts = torch.stack([(y == v).float().mean() for v in q.levels])
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)  # k-quantile bins hold equal mass


def test_ste_gradients():
    w = torch.randn(100, requires_grad=True)
    QuantileWeightQuantizer(3)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones(100))
    q = QuantileActQuantizer(2, signed=False)
    with calibrating(q):
        q(torch.rand(5000) * 4)
    x = torch.tensor([-1.0, 0.0, 1.0, 100.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]  # clipped STE between the lowest and highest level


def test_empirical_unsigned_levels_keep_zero():
    x = torch.cat([torch.zeros(5000), torch.linspace(0, 3, 30001)[1:]])
    lv, ed = empirical_quantile_levels(x, 2, signed=False)
    assert lv[0] == 0
    assert torch.allclose(lv[1:], torch.tensor([0.5, 1.5, 2.5]), atol=1e-3)  # 3 quantile levels of U(0, 3]
    assert torch.allclose(ed, torch.tensor([0.25, 1.0, 2.0]), atol=1e-3)


def test_integer_representation_single_scale():
    lv, _ = gaussian_quantile_levels(3)
    scale, ints = integer_representation(lv, 8, signed=True)
    assert int(ints.abs().max()) == 127 and ints.dtype == torch.int32
    assert float((scale * ints - lv).abs().max()) <= float(scale) / 2 + 1e-7
    assert torch.equal(ints, -ints.flip(0))  # symmetric levels give symmetric integers
    q = QuantileWeightQuantizer(3, int_bits=8, snap=True)
    y = q(torch.randn(1000))
    g = q.grid()
    assert torch.allclose(g.levels, g.scale * g.int_levels.float())
    assert set(y.unique().tolist()) <= set(g.levels.tolist())
    s0, i0 = integer_representation(torch.zeros(4), 8, signed=True)  # constant: no NaN
    assert torch.isfinite(s0) and bool((i0 == 0).all())


def test_level_report_writes_table_and_png(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    q = quantize(net, Recipe(method="nonuniform", w_bits=2, a_bits=2, first_last="same"))
    with calibrating(q):
        q(torch.randn(16, 1, 8, 8))
    q(torch.randn(2, 1, 8, 8))
    md, png = level_report(q, tmp_path)
    text = md.read_text()
    assert text.count("\n| ") == 5  # header + 4 quantizers (2 weights, 2 activations)
    assert png.stat().st_size > 1000


def test_fused_kernels_match_eager():
    """Weights (plain STE) and activations (clipped STE): fused look-up equals eager bit for bit."""
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.1
    assert_fused_matches(QuantileWeightQuantizer(3), w, kernel_names=("_level_lookup",))
    q = QuantileActQuantizer(3, signed=False, track_momentum=None)  # no tracking: no random sample per call
    x = torch.randn(4, 16, 16, 16).relu()
    with calibrating(q):
        q(x)
    assert_fused_matches(q, x * 1.5, kernel_names=("_level_lookup", "_level_backward"))


def test_weight_levels_refit_every_n_training_calls_and_every_eval_call():
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    q = QuantileWeightQuantizer(3, refresh_every=3)
    ref = QuantileWeightQuantizer(3, refresh_every=1)  # the behaviour before the option: refit at every call
    fits = []
    for step in range(7):
        wi = w * (1 + 0.1 * step) + 0.01 * step
        y, yr = q(wi), ref(wi)
        fits.append(q.levels.clone())
        if step % 3 == 0:  # calls 1, 4, 7: refit, exactly the every-call result
            assert torch.equal(q.levels, ref.levels) and torch.equal(y, yr)
        else:  # in between: the last fit's levels
            assert torch.equal(q.levels, fits[step - 1]) and not torch.equal(q.levels, ref.levels)
            assert set(y.unique().tolist()) <= set(q.levels.tolist())
    q.eval()
    ref.eval()
    wi = w * 3.0
    assert torch.equal(q(wi), ref(wi)) and torch.equal(q.grid().levels, ref.grid().levels)
    q.refresh()
    q.train()
    q(w)
    ref(w)  # eval: refits
    assert torch.equal(q.levels, ref.levels)
    with pytest.raises(ValueError, match="refresh_every"):
        QuantileWeightQuantizer(3, refresh_every=0)

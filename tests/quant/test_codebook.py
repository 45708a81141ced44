"""CLIP-Q quantizer: clipping, interval means, level count, sparsity, STE gradient, state round trip."""

from __future__ import annotations

import pytest
import torch

from qcnn.methods import quantize
from qcnn.methods.clipq import ClipQOptions, layer_params
from qcnn.quant.codebook import ClipQQuantizer, FixedCodebook, clipq_quantize
from qcnn.recipes import Recipe
from qcnn.transform import quantized_layers


def test_clip_per_side_and_interval_means():
    w = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0])
    wq, levels = clipq_quantize(w, 0.5, 2)
    # half of each side nearest zero is clipped; the kept +-3, +-4 fall in the outer intervals of [-4, 4]
    assert wq.tolist() == [0.0, 0.0, 0.0, 0.0, 3.5, -3.5, 3.5, -3.5]
    assert levels.numel() == 4 and levels[0] == 0


def test_interval_means_hand_computed():
    w = torch.tensor([-4.0, -3.0, -1.0, 1.0, 2.0, 5.0, 6.0])
    wq, levels = clipq_quantize(w, 0.0, 2)
    # [-4, 6] in 3 intervals of width 10/3: {-4, -3, -1} {1, 2} {5, 6}
    expect = [-8 / 3, -8 / 3, -8 / 3, 1.5, 1.5, 5.5, 5.5]
    assert torch.allclose(wq, torch.tensor(expect))
    assert torch.allclose(levels, torch.tensor([0.0, -8 / 3, 1.5, 5.5]))


def test_separate_thresholds_for_each_sign():
    # 4 positives, 2 negatives: p = 0.5 clips 2 positives and 1 negative
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, -0.05, -0.9])
    wq, _ = clipq_quantize(w, 0.5, 3)
    assert (wq == 0).tolist() == [True, True, False, False, True, False]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.75])
@pytest.mark.parametrize("gapless", [False, True])
def test_levels_and_sparsity(bits, p, gapless):
    torch.manual_seed(bits)
    w = torch.randn(32, 16, 3, 3)
    q = ClipQQuantizer(bits, p, gapless=gapless)
    wq = q(w)
    assert torch.unique(wq).numel() <= 2**bits
    n_pos, n_neg = int((w > 0).sum()), int((w < 0).sum())
    expected_zeros = int(p * n_pos) + int(p * n_neg)
    assert int((wq == 0).sum()) == expected_zeros
    # every non-zero output is one of the grid's levels
    lv = q.grid().levels
    assert torch.isin(wq, lv).all()


def test_ste_gradient_reaches_clipped_weights():
    w = torch.randn(100, requires_grad=True)
    q = ClipQQuantizer(2, 0.6)
    g = torch.randn(100)
    (q(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_constant_and_zero_tensors_give_no_nan():
    for w in (torch.zeros(10), torch.full((10,), 0.7), torch.full((10,), -0.2)):
        wq, levels = clipq_quantize(w, 0.5, 3)
        assert torch.isfinite(wq).all() and torch.isfinite(levels).all()
    wq, _ = clipq_quantize(torch.full((10,), 0.7), 0.5, 3)
    assert wq.tolist() == [0.0] * 5 + [pytest.approx(0.7)] * 5


def test_state_dict_round_trip_restores_p_and_bits():
    q = ClipQQuantizer(3, 0.5)
    q.set_params(0.25, 4)
    q(torch.randn(50))
    q2 = ClipQQuantizer(2, 0.9)
    q2.load_state_dict(q.state_dict())
    assert q2.bits == 4 and float(q2.p) == 0.25
    w = torch.randn(200)
    assert torch.equal(q(w), q2(w))


def test_bad_p_is_refused():
    with pytest.raises(ValueError, match="p=1.5"):
        ClipQQuantizer(3, 1.5)
    with pytest.raises(ValueError, match="unknown key"):
        ClipQOptions(layers={"fc*": {"q": 1}})


def test_recipe_per_layer_params():
    opts = ClipQOptions(p=0.4, layers={"fc*": [0.8, 2], "fc3": {"bits": 5}})
    assert layer_params(opts, "conv1", 3) == (0.4, 3)
    assert layer_params(opts, "fc1", 3) == (0.8, 2)
    assert layer_params(opts, "fc3", 3) == (0.8, 5)
    from qcnn.models import build_model

    r = Recipe.from_dict({"method": "clipq", "w_bits": 3, "a_bits": None, "first_last": "same",
                          "params": {"p": 0.4, "layers": {"fc*": [0.8, 2]}}})
    q = quantize(build_model("lenet5", in_channels=1), r)
    got = {n: (round(float(m.weight_quant.p), 3), m.weight_quant.bits) for n, m in quantized_layers(q)}
    assert got == {"conv1": (0.4, 3), "conv2": (0.4, 3), "fc1": (0.8, 2), "fc2": (0.8, 2), "fc3": (0.8, 2)}
    assert all(m.input_quant is None for _, m in quantized_layers(q))  # activations stay float


def test_fixed_codebook_snaps_exactly():
    lv = torch.tensor([-0.3, 0.0, 0.1, 0.7])
    q = FixedCodebook(lv)
    assert q.bits == 2
    assert q(torch.tensor([-1.0, 0.04, 0.06, 0.39, 0.41])).tolist() == pytest.approx([-0.3, 0.0, 0.1, 0.1, 0.7])
    on_grid = lv[torch.randint(0, 4, (100,))]
    assert torch.equal(q(on_grid), on_grid)


@pytest.mark.parametrize("gapless", [False, True])
def test_clipq_fused_lookup_matches_eager(gapless):
    """Between refreshes the Clip-Q look-up runs as one fused kernel, equal to the eager one bit for bit; a
    refresh call (sort) and refresh_every=1 match as well."""
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3) * 0.1
    q = ClipQQuantizer(3, 0.5, gapless=gapless, refresh_every=4)
    q(w)  # the refresh: the partition of w
    assert_fused_matches(q, w + 0.01 * torch.randn_like(w), kernel_names=("_clipq_lookup",))
    if not gapless:
        assert_fused_matches(ClipQQuantizer(3, 0.5, refresh_every=1), w)


def test_clipq_refresh_rule():
    """Training: the partition is recomputed at calls 1, N+1, ... (exactly clipq_quantize then), the calls in
    between quantize with the last partition; eval and refresh_every=1 are exact at every call."""
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    q = ClipQQuantizer(3, 0.4, refresh_every=3)
    for step in range(7):
        wi = w + 0.05 * step * torch.randn_like(w)
        y = q(wi)
        exact, levels = clipq_quantize(wi, 0.4, 3)
        if step % 3 == 0:
            assert torch.equal(y, exact) and torch.equal(q.levels, levels)
        else:
            last = q.levels
            assert torch.isin(y, last).all()  # the codebook of the last refresh
            assert not torch.equal(q.levels, levels)
            stale_lo = last[1:].min()
            assert bool((y[wi < stale_lo] == stale_lo).all())
    q.eval()
    wi = w * 2
    assert torch.equal(q(wi), clipq_quantize(wi, 0.4, 3)[0])
    assert torch.equal(q.grid().levels, q.grid(wi).levels)
    every = ClipQQuantizer(3, 0.4, refresh_every=1)
    for step in range(3):
        wi = w + 0.05 * step * torch.randn_like(w)
        assert torch.equal(every(wi), clipq_quantize(wi, 0.4, 3)[0])
    q.train()
    q.set_params(0.2, 2)  # new (p, b): recomputed at the next call
    assert torch.equal(q(w), clipq_quantize(w, 0.2, 2)[0])


def test_fixed_codebook_fused_matches_eager():
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    assert_fused_matches(FixedCodebook(torch.tensor([-1.5, -0.4, 0.0, 0.3, 1.2])), w, kernel_names=("_nearest_level",))

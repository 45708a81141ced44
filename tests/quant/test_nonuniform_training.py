"""Non-uniform k-quantile activations follow the training distribution (EMA of the batch k-quantiles).

Levels frozen at calibration made LeNet-5 trained from scratch on Fashion-MNIST barely learn (60.97 % after
2 epochs): the activation ranges of an untrained network change in training, and every input above the
stale top level lands on one level with no gradient (clipped STE). These tests check the tracking on a
synthetic shift and on a short from-scratch run on real data.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qcnn.calib import calibrating
from qcnn.methods import calibrate, quantize
from qcnn.models import build_model
from qcnn.quant.nonuniform import QuantileActQuantizer, empirical_quantile_levels
from qcnn.recipes import Recipe

RECIPE = "recipes/nonuniform.yaml"


def _calibrated(x: torch.Tensor, **kw) -> QuantileActQuantizer:
    q = QuantileActQuantizer(3, signed=False, **kw)
    with calibrating(q):
        q(x)
    return q


def test_levels_follow_a_shifted_distribution_in_training_only():
    torch.manual_seed(0)
    q = _calibrated(torch.rand(20000))  # U(0, 1)
    before = q.levels.clone()
    wide = lambda: 4 * torch.rand(20000)  # noqa: E731 - the distribution has become U(0, 4)
    q.eval()
    for _ in range(5):
        q(wide())
    assert torch.equal(q.levels, before)  # eval mode never moves the levels
    assert float((wide() > q.levels[-1]).float().mean()) > 0.7  # stale levels: most inputs above the top
    q.train()
    for _ in range(60):  # 0.9^60 < 2e-3 of the calibration levels remain
        q(wide())
    target, _ = empirical_quantile_levels(wide(), 3, signed=False)
    assert torch.allclose(q.levels, target, atol=0.05)
    x = wide()
    assert float((x > q.levels[-1]).float().mean()) < 0.1  # ~1/14 above the top level, as the quantiles say
    q.eval()
    g = q.grid()  # still one scale times 8-bit integers
    assert torch.allclose(g.levels, g.scale * g.int_levels.float())
    assert set(q(x).unique().tolist()) <= set(g.levels.tolist())


def test_fixed_levels_option_and_state_dict_round_trip():
    torch.manual_seed(0)
    fixed = _calibrated(torch.rand(20000), track_momentum=None)
    lv = fixed.levels.clone()
    fixed.train()
    fixed(4 * torch.rand(20000))
    assert torch.equal(fixed.levels, lv)
    with pytest.raises(ValueError, match="track_momentum"):
        QuantileActQuantizer(3, track_momentum=1.0)
    q = _calibrated(torch.rand(20000))
    q2 = QuantileActQuantizer(3, signed=False)
    q2.load_state_dict(q.state_dict())  # the EMA's unsnapped copies are not part of the state
    assert set(q.state_dict()) == {"levels", "edges", "scale", "int_levels", "initialized"}
    q2.train()
    q2(4 * torch.rand(20000))  # tracking restarts from the loaded levels
    assert float(q2.levels[-1]) > float(lv[-1])
    recipe = Recipe.from_yaml(RECIPE)
    assert recipe.params["track_momentum"] == 0.9


def test_lenet5_from_scratch_learns_on_fashion_mnist(fashion_dir):
    """100 steps from random init with the recipe, calibrated as an untrained network in eval mode (BN with
    its initial statistics): the top level must keep up with the inputs, and the network must learn."""
    from qcnn.data import get_data
    from qcnn.train import evaluate

    torch.manual_seed(0)
    recipe = Recipe.from_yaml(RECIPE)
    b = get_data("fashion-mnist", fashion_dir, batch_size=recipe.train.batch_size, augment=False)
    b = dataclasses.replace(b, train=b.train.take(100 * 128), test=b.test.take(1000), calib=b.calib.take(512))
    q = quantize(build_model("lenet5", in_channels=1), recipe)
    calibrate(q, b.calib)
    acts = {n: m for n, m in q.named_modules() if isinstance(m, QuantileActQuantizer)}
    above: dict[str, float] = {}  # fraction of the layer's input above its top level, last batch

    def record(name):
        return lambda m, inp, out: above.__setitem__(name, float((inp[0] > m.levels[-1]).float().mean()))

    # the image's range never changes: conv1's input is not watched
    hooks = [m.register_forward_hook(record(n)) for n, m in acts.items() if n != "conv1.input_quant"]
    opt = torch.optim.SGD(q.parameters(), lr=recipe.train.lr, momentum=0.9, nesterov=True)
    q.train()
    history = []
    for x, y in b.train:
        loss = F.cross_entropy(q(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(dict(above))
    for h in hooks:
        h.remove()
    late = {n: sum(h[n] for h in history[50:]) / len(history[50:]) for n in history[0]}
    top1 = evaluate(q, b.test)["top1"]
    assert max(late.values()) < 0.05, late  # fixed levels: 47 % of fc1's inputs above its top level
    assert top1 > 72.0, top1  # fixed levels: 60.6 after these 100 steps (tracked: 79.6)

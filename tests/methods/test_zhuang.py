"""Zhuang et al. procedures: budget split, two-step / progressive stages, guided loss and taps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcnn.methods import run_recipe
from qcnn.methods.zhuang import (
    GuidedPair,
    add_taps,
    default_guide_layers,
    guidance_distance,
    guided_loss,
    progressive_bits,
    remove_taps,
    split_budget,
)
from qcnn.nn.layers import QConv2d
from qcnn.quant.dorefa import DoReFaActivation
from qcnn.recipes import Recipe


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(_Block(8), _Block(8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


class _Loader:
    def __init__(self, batches):
        self.batches = batches
        self.epochs_seen = []

    def __len__(self):
        return len(self.batches)

    def set_epoch(self, e):
        self.epochs_seen.append(e)

    def __iter__(self):
        return iter(self.batches)


def _bundle(n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, 1, 6, 6, generator=g)

    def batch():
        y = torch.randint(0, 4, (16,), generator=g)
        return protos[y] + 0.5 * torch.randn(16, 1, 6, 6, generator=g), y

    return SimpleNamespace(train=_Loader([batch() for _ in range(n_batches)]), test=_Loader([batch()]),
                           calib=_Loader([batch()]))


def test_split_budget_fractions_of_steps():
    r = Recipe(train={"epochs": 2})
    assert split_budget(r, 10, None, 2) == [(1, 10), (1, 10)]
    assert split_budget(r, 10, None, 4) == [(1, 5)] * 4
    assert split_budget(Recipe(train={"epochs": 1}), 10, [0.2, 0.8], 2) == [(1, 2), (1, 8)]
    assert split_budget(Recipe(train={"epochs": 4}), 10, [1, 3], 2) == [(1, 10), (3, 10)]
    with pytest.raises(ValueError, match="split"):
        split_budget(r, 10, [1.0], 2)


def test_progressive_bits_end_with_recipe_bits():
    r = Recipe(w_bits=2, a_bits=2)
    assert progressive_bits(r, None) == [(8, 8), (4, 4), (2, 2)]
    assert progressive_bits(r, [8, [4, 8], 2]) == [(8, 8), (4, 8), (2, 2)]


def test_guidance_distance_formula():
    f = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    g = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # sample 0: (0.6-0.8)^2 + (0.8-0.6)^2 = 0.08; sample 1: 1 + 1 = 2; mean = 1.04
    assert math.isclose(float(guidance_distance(f, g)), 1.04, rel_tol=1e-6)


def test_taps_keep_outputs_and_are_removed():
    torch.manual_seed(0)
    net = _Net().eval()
    assert default_guide_layers(net) == ["layer1"]
    x = torch.randn(2, 1, 6, 6)
    tapped = add_taps(net, ["layer1"])
    seen = []
    tapped.guide_tap_0.register_forward_hook(lambda m, i, o: seen.append(o))
    assert torch.equal(tapped(x), net(x))
    assert torch.equal(seen[0], net.layer1(net.stem(x)))
    clean = remove_taps(tapped)
    assert not hasattr(clean, "guide_tap_0") and torch.equal(clean(x), net(x))
    with pytest.raises(ValueError, match="nope"):
        add_taps(net, ["nope"])


def test_guided_loss_gives_each_net_its_own_gradient():
    torch.manual_seed(0)
    low, full = add_taps(_Net(), ["layer1"]), add_taps(_Net(), ["layer1"])
    pair = GuidedPair(low, full, ["guide_tap_0"])
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,))
    lam = 0.7
    loss, logits = guided_loss(lam)(pair, x, y)
    loss.backward()
    got = pair.low.fc.weight.grad.clone()
    # reference: the low net's own loss CE_low + lam/2 * D with the full net's features held fixed
    pair.zero_grad()
    pair.full(x)
    f_full = pair.feats["full"][0].detach()
    logits_low = pair.low(x)
    own = F.cross_entropy(logits_low, y) + lam / 2 * guidance_distance(pair.feats["low"][0], f_full)
    own.backward()
    assert torch.allclose(got, pair.low.fc.weight.grad, atol=1e-6)
    assert torch.equal(logits, pair.low(x))


def _recipe(procedure, **pp):
    return Recipe(method="dorefa", w_bits=2, a_bits=2, first_last="8bit", procedure=procedure,
                  procedure_params=pp, train={"epochs": 2, "optimizer": "adam", "lr": 0.01, "schedule": "constant"})


def test_two_step_stages(tmp_path):
    torch.manual_seed(0)
    bundle = _bundle()
    q, m = run_recipe(_Net(), bundle, _recipe("two_step"), tmp_path)
    assert [s["a_bits"] for s in m["stages"]] == [None, 2]
    assert [s["epochs"] for s in m["stages"]] == [1, 1]
    assert isinstance(q.get_submodule("layer1.0.conv").input_quant, DoReFaActivation)
    assert (tmp_path / "stage0" / "stage.pt").is_file() and (tmp_path / "stage1" / "stage.pt").is_file()
    # resume skips finished stages and gives back the same model
    q2, m2 = run_recipe(_Net(), bundle, _recipe("two_step"), tmp_path, resume=True)
    x = bundle.test.batches[0][0]
    assert torch.equal(q2.eval()(x), q.eval()(x)) and m2["top1"] == m["top1"]


def test_progressive_stages():
    torch.manual_seed(0)
    bundle = _bundle()
    q, m = run_recipe(_Net(), bundle, _recipe("progressive", bits=[8, 4]))
    assert [(s["w_bits"], s["a_bits"]) for s in m["stages"]] == [(8, 8), (4, 4), (2, 2)]
    assert [s["batches_per_epoch"] for s in m["stages"]] == [4, 4, 4]  # 12 steps split in 3
    assert q.get_submodule("layer1.0.conv").input_quant.bits == 2
    assert isinstance(q.get_submodule("layer1.0.conv"), QConv2d)


def test_guided_trains_both_nets():
    torch.manual_seed(0)
    bundle = _bundle()
    net = _Net()
    w0 = net.fc.weight.detach().clone()
    q, m = run_recipe(net, bundle, _recipe("guided", lam=0.5, layers=["layer1"]))
    assert m["layers"] == ["layer1"] and "full_precision_top1" in m
    assert not any(n.startswith("guide_tap") for n, _ in q.named_modules())
    assert not torch.equal(q.fc.weight.detach(), w0)
    with pytest.raises(ValueError, match="procedure_params"):
        run_recipe(_Net(), bundle, _recipe("guided", lamda=1.0))


@pytest.mark.parametrize("procedure", ["two_step", "progressive"])
def test_each_stage_starts_from_the_previous_stage_weights(monkeypatch, procedure):
    """Stage k+1 is quantized from stage k's trained weights, never from the float model again."""
    import qcnn.methods.zhuang as zh

    starts, ends = [], []
    real_qc, real_train = zh.quantize_and_calibrate, zh.train_quantized

    def spy_qc(model, recipe, bundle):
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("weight")})
        return real_qc(model, recipe, bundle)

    def spy_train(qmodel, *a, **kw):
        out = real_train(qmodel, *a, **kw)
        ends.append({k: v.detach().clone() for k, v in qmodel.state_dict().items() if k.endswith("weight")})
        return out

    monkeypatch.setattr(zh, "quantize_and_calibrate", spy_qc)
    monkeypatch.setattr(zh, "train_quantized", spy_train)
    torch.manual_seed(0)
    net = _Net()
    float_w = {k: v.detach().clone() for k, v in net.state_dict().items() if k.endswith("weight")}
    pp = {"bits": [8, 4]} if procedure == "progressive" else {}
    run_recipe(net, _bundle(), _recipe(procedure, **pp))
    assert len(starts) == len(ends) >= 2
    assert all(torch.equal(starts[0][k], float_w[k]) for k in float_w)
    for k in range(1, len(starts)):
        for name, w in starts[k].items():
            assert torch.equal(w, ends[k - 1][name]), (k, name)
        assert any(not torch.equal(starts[k][n], float_w[n]) for n in float_w), k

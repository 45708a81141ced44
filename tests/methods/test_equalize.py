"""Cross-layer equalization and high-bias absorption (Nagel et al., ICCV 2019): the function is kept, channel
ranges are equalized (r1_i == r2_i), residual forks and ReLU6 are handled, the quantized graph gains from it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import fx, nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.methods.equalize import (
    EqualizeReport,
    _float_forward,
    _in_range,
    _out_range,
    absorb_high_bias,
    align_pot_activations,
    cross_layer_equalize,
    scale_residual_stream,
)
from qcnn.models import build_model, load_weights
from qcnn.nn.layers import ChannelClamp, QAct
from qcnn.recipes import Recipe
from qcnn.transform import float_twin, fold_bn, set_module


def _unequal(seed=0):
    """conv-BN-ReLU-conv-BN-ReLU-pool-flatten-linear whose first conv has channels x100 and x0.01 (undone in
    the second conv's inputs, so the network itself is ordinary)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        s = torch.ones(8)
        s[:2], s[2:4] = 100.0, 0.01
        m[0].weight.mul_(s.view(-1, 1, 1, 1))
        m[0].bias.mul_(s)
        m[3].weight.div_(s.view(1, -1, 1, 1))
    return m.eval()


def _x(shape=(16, 3, 8, 8), seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _range_mismatch(model, pair):
    a, b = (model.get_submodule(n) for n in pair)
    return float((_out_range(a) / _in_range(b) - 1).abs().max())


@torch.no_grad()
def test_cle_keeps_function_and_equalizes_ranges():
    m = _unequal().double()
    x = _x()
    y0 = m(x)
    rep = cross_layer_equalize(m, iterations=100, tol=1e-8)
    assert isinstance(rep, EqualizeReport)
    assert rep.pairs == [("0", "3"), ("3", "8")]
    assert isinstance(m[1], nn.Identity) and isinstance(m[4], nn.Identity)  # BN folded in place
    assert _rel(m(x), y0) < 1e-5
    assert rep.range_spread_before["0"] > 50 and rep.range_spread_after["0"] < 5
    assert rep.range_spread_after["3"] < 5
    assert 2 <= rep.iterations < 100  # converged before the limit
    for pair in rep.pairs:  # the paper's fixed point: r1_i == r2_i for every channel
        assert _range_mismatch(m, pair) < 1e-4


@torch.no_grad()
def test_single_pair_scales_follow_the_paper():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 1)).double()
    with torch.no_grad():
        m[0].weight[0].mul_(50)
    r1, r2 = _out_range(m[0]).clone(), _in_range(m[2]).clone()
    gm = fx.symbolic_trace(m)
    x = _x((4, 3, 7, 7))
    y0 = gm(x)
    rep = cross_layer_equalize(gm)
    assert rep.pairs == [("0", "2")] and rep.iterations == 2  # second sweep: all s_i == 1
    expect = torch.sqrt(r1 * r2)  # both ranges become sqrt(r1_i r2_i)
    assert torch.allclose(_out_range(gm.get_submodule("0")), expect, rtol=1e-10)
    assert torch.allclose(_in_range(gm.get_submodule("2")), expect, rtol=1e-10)
    assert _rel(gm(x), y0) < 1e-10


@torch.no_grad()
def test_depthwise_chain():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU(),
                      nn.Conv2d(12, 6, 1)).double()
    with torch.no_grad():
        m[0].weight[:3].mul_(30)
        m[2].weight[5:8].mul_(30)
    x = _x((4, 4, 6, 6))
    y0 = m(x)
    rep = cross_layer_equalize(m, iterations=200, tol=1e-7)
    assert rep.pairs == [("0", "2"), ("2", "4")]
    assert _rel(m(x), y0) < 1e-5
    for name in ("0", "2"):  # about 27 and 30 before, 3.0 after
        assert rep.range_spread_before[name] > 20 and rep.range_spread_after[name] < 5
    for pair in rep.pairs:
        assert _range_mismatch(m, pair) < 1e-3


def _relu6_to_relu(model):
    ref = copy.deepcopy(model)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, nn.ReLU6):
            set_module(ref, name, nn.ReLU())
    return ref


@torch.no_grad()
def test_mobilenet_v2_relu6_modes():
    torch.manual_seed(0)
    base = fold_bn(torchvision.models.mobilenet_v2(weights=None).eval()).double()
    x = _x((2, 3, 32, 32)) * 30  # large enough that some activations exceed 6
    ref = _relu6_to_relu(base)
    assert _rel(base(x), ref(x)) > 1e-3  # ReLU6 -> ReLU does change this network

    m = copy.deepcopy(base)
    rep = cross_layer_equalize(m, relu6="relu")
    assert len(rep.relu6_replaced) == 35 and len(rep.pairs) == 37  # every ReLU6 sits between two layers
    assert not any(isinstance(mod, nn.ReLU6) for mod in m.modules())
    assert _rel(m(x), ref(x)) < 1e-4
    assert max(rep.range_spread_after.values()) < max(rep.range_spread_before.values())

    m = copy.deepcopy(base)  # the default, "clip": per-channel clamps keep the ReLU6 network's function
    rep = cross_layer_equalize(m)
    clamps = [mod for mod in m.modules() if isinstance(mod, ChannelClamp)]
    assert len(rep.relu6_replaced) == 35 == len(clamps) and len(rep.pairs) == 37
    assert _rel(m(x), base(x)) < 1e-10 and _rel(m(x), ref(x)) > 1e-3
    bounds = torch.cat([c.upper for c in clamps])
    assert float(bounds.min()) < 3 and float(bounds.max()) > 12  # 6 / s_i: the scales moved the bounds
    again = cross_layer_equalize(m)  # equalizing again keeps the clamps (treated as bounded, not as ReLU)
    assert again.relu6_replaced == [] and len(again.pairs) == 37 and _rel(m(x), base(x)) < 1e-10

    m = copy.deepcopy(base)
    y0 = base(x)
    rep = cross_layer_equalize(m, relu6="skip")
    assert rep.relu6_replaced == [] and sum(isinstance(mod, nn.ReLU6) for mod in m.modules()) == 35
    # only the linear project -> expand pairs without a residual fork remain
    assert rep.pairs == [("features.1.conv.1", "features.2.conv.0.0"), ("features.17.conv.2", "features.18.0")]
    assert _rel(m(x), y0) < 1e-5


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 1), nn.Linear(6, 2)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.conv1(x))
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv2(x)), 1)
        return self.fc(x.view(x.size(0), -1))


@torch.no_grad()
def test_functional_relu6_and_view_after_global_pool():
    torch.manual_seed(0)
    plain = _Functional().double()
    with torch.no_grad():
        plain.conv1.weight[0].mul_(40)
    x = _x((4, 3, 6, 6)) * 0.01
    assert float(plain.conv1(x).max()) < 6  # ReLU6 == ReLU on this data
    y0 = plain(x)
    rep = cross_layer_equalize(copy.deepcopy(plain))  # its forward cannot be rewritten: F.relu6 pair skipped
    assert rep.pairs == [("conv2", "fc")] and rep.relu6_replaced == []
    gm = fx.symbolic_trace(copy.deepcopy(plain))
    rep = cross_layer_equalize(gm, relu6="relu")
    assert rep.pairs == [("conv1", "conv2"), ("conv2", "fc")] and rep.relu6_replaced == ["relu6"]
    assert "functional.relu6" not in gm.code and "functional.relu(conv1)" in gm.code
    assert rep.range_spread_before["conv1"] > 30 and rep.range_spread_after["conv1"] < 8  # 39.6 -> 5.1
    assert _rel(gm(x), y0) < 1e-10
    gm = fx.symbolic_trace(copy.deepcopy(plain))
    rep = cross_layer_equalize(gm)  # "clip": the function node becomes a ChannelClamp module
    assert rep.relu6_replaced == ["relu6"] and isinstance(gm.get_submodule("relu6_clamp"), ChannelClamp)
    assert _rel(gm(x * 100), plain(x * 100)) < 1e-10  # exact also where the ReLU6 clips


@torch.no_grad()
def test_residual_forks_are_skipped_resnet20():
    model = build_model("resnet20").eval()
    x = _x((2, 3, 32, 32), dtype=torch.float32)
    y0 = model(x)
    rep = cross_layer_equalize(model)
    # only conv1 -> relu -> conv2 inside each block: conv2 and the stem feed a residual add
    assert rep.pairs == [(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2") for s in (1, 2, 3) for b in range(3)]
    assert _rel(model(x), y0) < 1e-5


def _quantized_mse(model, recipe, x, equalize):
    q = quantize(model, recipe)
    if equalize:
        cross_layer_equalize(q)
    with calibrating(q):
        q(x)
    with torch.no_grad():
        return float((q(x) - model(x)).pow(2).mean())


def test_cle_on_quantized_graph_lowers_4bit_error():
    model = _unequal(seed=5)
    x = _x((32, 3, 8, 8), seed=4, dtype=torch.float32)
    recipe = Recipe(method="uniform", w_bits=4, a_bits=8, per_channel=False, fold_bn=True, first_last="same")
    q = quantize(model, recipe)
    before = {n: p.detach().clone() for n, p in q.named_parameters()}
    rep = cross_layer_equalize(q)
    assert rep.pairs == [("0", "3"), ("3", "8")]
    assert any(not torch.equal(p, before[n]) for n, p in q.named_parameters())
    plain = _quantized_mse(model, recipe, x, equalize=False)
    cle = _quantized_mse(model, recipe, x, equalize=True)
    assert cle < 0.05 * plain, (cle, plain)  # measured: 0.80 without CLE, 0.0030 with


@torch.no_grad()
def test_cle_runs_through_the_lookup_table_of_a_quantized_leaky_relu():
    """qcnn.quantize wraps a LeakyReLU into a QAct (a lookup table in integer inference) before it equalizes:
    the pairs still run through it (positively homogeneous; its quantizers calibrate afterwards), the float
    function is kept and the ranges are equalized."""
    model = _unequal(seed=2)
    model[2], model[5] = nn.LeakyReLU(0.1), nn.LeakyReLU(0.1, inplace=True)
    q = quantize(model, Recipe(method="uniform", w_bits=4, a_bits=8, fold_bn=True, first_last="same"))
    assert isinstance(q.get_submodule("2"), QAct) and isinstance(q.get_submodule("5").act, nn.LeakyReLU)
    x = _x((8, 3, 8, 8), dtype=torch.float32)
    y0 = float_twin(q)(x)
    rep = cross_layer_equalize(q, iterations=100, tol=1e-8)
    assert rep.pairs == [("0", "3"), ("3", "8")]
    assert _rel(float_twin(q)(x), y0) < 1e-5
    assert rep.range_spread_before["0"] > 50 and rep.range_spread_after["0"] < 5
    for pair in rep.pairs:
        assert _range_mismatch(q, pair) < 1e-4


def _biased_net():
    """1x1 conv -> ReLU -> 1x1 conv -> ReLU -> global pool -> linear with high biases. On inputs uniform in
    [0, 1) every pre-activation is an affine map of 3 uniforms, so it lies within 3 std of its mean: with
    n_sigma = 3, x - c >= 0 always and the absorption is exact (the Gaussian tail of a wider sum would not be)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        m[0].bias.copy_(torch.tensor([-3.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))  # channel 0: always below 0
        m[2].bias.copy_(torch.linspace(0.0, 5.0, 8))
    return m.eval()


@torch.no_grad()
def test_high_bias_absorption():
    m = _biased_net()
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(2)).double()
    y0 = m(x)
    b1, b2 = m[0].bias.clone(), m[2].bias.clone()
    n = absorb_high_bias(m, [(x[:32], None), (x[32:], None)], n_sigma=3.0)
    assert n > 8  # channels of both pairs
    c = b1 - m[0].bias
    assert float(c[0]) == 0.0 and (c >= 0).all() and float(c[-1]) > 4.0  # c_i = max(0, beta_i - 3 gamma_i)
    assert float((m[2].bias - b2).abs().max()) > 0.1  # compensation W2 c absorbed into layer2's bias
    assert _rel(m(x), y0) < 1e-4


@torch.no_grad()
def test_high_bias_absorption_from_bn_stats_and_on_quantized_graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        m[1].bias.copy_(torch.tensor([5.0, -1.0, 4.0, 0.0]))
        m[1].weight.copy_(torch.tensor([1.0, 1.0, 0.5, 1.0]))
    assert absorb_high_bias(copy.deepcopy(m)) == 2  # c = max(0, beta - 3 |gamma|) > 0 for channels 0 and 2
    q = quantize(m, Recipe(method="uniform", fold_bn=True, first_last="same"))
    with pytest.raises(ValueError, match="calib_batches"):
        absorb_high_bias(q)  # BN already folded, no data
    assert absorb_high_bias(q, _x((8, 3, 4, 4), dtype=torch.float32)) >= 1  # runs with quantizers bypassed


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


def test_bad_input():
    with pytest.raises(ValueError, match="_Untraceable.*fx-traceable"), pytest.warns(UserWarning):
        cross_layer_equalize(_Untraceable())
    with pytest.raises(ValueError, match="bogus"):
        cross_layer_equalize(_unequal(), relu6="bogus")
    with pytest.raises(ValueError, match="iterations"):
        cross_layer_equalize(_unequal(), iterations=0)


# ----------------------------------------------------------------------------------- residual stream scaling
def _stream_input(model, x):
    seen = {}
    h = model.layer2[0].conv1.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].clone()))
    try:
        model(x)
    finally:
        h.remove()
    return seen["x"]


@torch.no_grad()
@pytest.mark.parametrize("train", [False, True])
def test_stream_scaling_keeps_function_and_scales_block_inputs(train):
    torch.manual_seed(0)
    model = build_model("resnet20").double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-30  # the only inexact part: eps is kept, so with eps ~ 0 the function is exact
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.3, 0.3)
    ref = copy.deepcopy(model)
    names = scale_residual_stream(model, 0.4)
    assert names == ["bn1"] + [f"layer{s}.{b}.bn2" for s in (1, 2, 3) for b in range(3)]
    model.train(train), ref.train(train)
    x = _x((4, 3, 32, 32))
    assert _rel(model(x), ref(x)) < 1e-10
    ratio = _stream_input(model, x) / _stream_input(ref, x).clamp_min(1e-12)
    nz = _stream_input(ref, x) > 1e-6
    assert torch.allclose(ratio[nz], torch.full_like(ratio[nz], 0.4), atol=1e-9)


@torch.no_grad()
def test_stream_scaling_default_eps_and_bad_input():
    model = build_model("resnet20").eval()
    ref = copy.deepcopy(model)
    scale_residual_stream(model, 0.5)
    x = _x((2, 3, 32, 32), dtype=torch.float32)
    assert _rel(model(x), ref(x)) < 1e-4
    with pytest.raises(ValueError, match="c=0"):
        scale_residual_stream(model, 0)
    with pytest.raises(ValueError, match="no BatchNorm feeding a residual addition"):
        scale_residual_stream(_unequal(), 0.5)
    plain = _unequal()
    ref = copy.deepcopy(plain)
    assert scale_residual_stream(plain, 0.5, strict=False) == []
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ref.state_dict().values()))

    class Bounded(nn.Module):  # ReLU6 on the stream is not positively homogeneous
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
            self.conv2, self.bn2, self.fc = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 2)

        def forward(self, x):
            y = self.act(self.bn(self.conv(x)))
            y = torch.nn.functional.relu6(y + self.bn2(self.conv2(y)))
            return self.fc(y.mean((2, 3)))

    with pytest.raises(ValueError, match="relu6.*not positively homogeneous"):
        scale_residual_stream(Bounded(), 0.5)


def test_run_recipe_scales_the_stream_once(monkeypatch):
    import qcnn.methods as methods

    seen = []
    monkeypatch.setattr(methods, "get_procedure", lambda name: lambda m, *a: seen.append(m) or (m, {}))
    model = build_model("resnet20").eval()
    gamma = model.layer1[0].bn2.weight.detach().clone()
    recipe = Recipe(method="dorefa", w_bits=2, a_bits=2, params={"stream_scale": 0.5})
    methods.run_recipe(model, None, recipe)
    assert torch.equal(model.layer1[0].bn2.weight, gamma)  # the caller's model is left alone
    assert torch.allclose(seen[0].layer1[0].bn2.weight, 0.5 * gamma)
    assert torch.equal(seen[0].layer1[0].bn1.weight, model.layer1[0].bn1.weight)
    methods.run_recipe(model, None, recipe.replace(params={}))
    assert torch.equal(seen[1].layer1[0].bn2.weight, gamma)


@torch.no_grad()
def test_stream_scale_brings_pretrained_block_inputs_under_dorefa_clip(cifar_zip, weights_dir):
    """DoReFa quantizes clip(a, 0, 1): on the pretrained ResNet-20 13-25 % of every block's input is above 1
    (top level, zero gradient), which held DoReFa W2A2 at 65 %; the recipe's stream scale 0.33 leaves <= 1 %."""
    from qcnn.data import get_data
    from qcnn.models import load_weights
    from qcnn.recipes import load_recipe

    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=128, augment=False, calib_size=256)
    model = load_weights(build_model("resnet20"), weights_dir / "resnet20-12fca82f.th").eval()
    c = load_recipe("dorefa").params["stream_scale"]

    def above_one(net):
        seen = {}
        blocks = [getattr(net, f"layer{s}")[b] for s in (1, 2, 3) for b in range(3)]
        hooks = [blk.conv1.register_forward_hook(lambda m, i, o, j=j: seen.setdefault(j, []).append(i[0]))
                 for j, blk in enumerate(blocks)]
        for x, _ in bundle.calib:
            net(x)
        for h in hooks:
            h.remove()
        return [float((torch.cat(v) > 1).float().mean()) for _, v in sorted(seen.items())]

    before = above_one(model)
    scaled = copy.deepcopy(model)
    scale_residual_stream(scaled, c)
    after = above_one(scaled)
    assert min(before) > 0.10
    assert max(after) < 0.015
    x = next(iter(bundle.calib))[0]
    assert torch.equal(model(x).argmax(1), scaled(x).argmax(1))


@torch.no_grad()
def test_pot_alignment_puts_each_activation_step_on_a_power_of_two(cifar_zip, weights_dir):
    """Pretrained MobileNetV2, per-tensor QCode W8A8 after CLE: every one of the 37 rescalable activations is
    scaled by c in [1, 2), and each of the 5 residual streams as a whole, with the float function kept; measured
    again, each calibrated free step is now a power of two (c = 1 or 2) and each stream keeps its factor; the
    activation quantizers' noise falls (measured: 3.4 dB on average, -0.08 at worst)
    and the logits get closer to float (measured 6.2 -> 9.8 dB on these 16 images, no bias correction)."""
    import math

    import torch.nn.functional as F

    from qcnn.data import get_data
    from qcnn.report.layers import sqnr_db

    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=16, augment=False, calib_size=16)
    x = F.interpolate(next(iter(bundle.calib))[0], size=96, mode="bilinear", align_corners=False)
    model = load_weights(build_model("tv:mobilenet_v2", num_classes=1000),
                         weights_dir / "mobilenet_v2-b0353104.pth").eval()
    recipe = Recipe(method="qcode", per_channel=False, w_bits=8, a_bits=8, calib="mse", first_last="same",
                    fold_bn=True, params={"unsigned_acts": True}, ptq={"equalize": True})
    plain = quantize(model, recipe).eval()
    aligned = copy.deepcopy(plain)
    rep = align_pot_activations(aligned, [x])
    assert len(rep.pairs) == 37 and rep.skipped == []
    assert all(1.0 <= c < 2.0 for c in rep.factors.values()) and max(rep.factors.values()) > 1.5
    # the five residual streams (24, 32, 64, 96, 160 channels), each written by its blocks' project convs
    assert sorted(len(p) for p, _ in rep.streams) == [2, 3, 3, 3, 4]
    assert all(1.0 <= c < 2.0 for _, c in rep.streams)
    with _float_forward(plain), _float_forward(aligned):
        assert _rel(aligned(x), plain(x)) < 1e-5
    again = align_pot_activations(copy.deepcopy(aligned), [x])
    assert max(min(abs(c - 1), abs(c - 2)) for c in again.factors.values()) < 1e-4
    assert all(min(abs(math.log2(c)), abs(math.log2(c) - 1)) <= 1 / 32 + 1e-6 for _, c in again.streams)
    ref, noise, logits = model(x), {}, {}
    for name, m in (("plain", plain), ("aligned", aligned)):
        with calibrating(m):
            m(x)
        err = noise[name] = {}

        def hook(mod, a, n, err=err):
            q = mod.input_quant
            err[n] = float(((q(a[0]) - a[0]) ** 2).sum() / (a[0] ** 2).sum())

        hs = [m.get_submodule(n).register_forward_pre_hook(lambda mod, a, n=n: hook(mod, a, n)) for _, n in rep.pairs]
        logits[name] = sqnr_db(ref, m(x))
        for h in hs:
            h.remove()
    gain = [10 * math.log10(noise["plain"][n] / noise["aligned"][n]) for _, n in rep.pairs]
    assert sum(gain) / len(gain) > 2.0 and min(gain) > -0.5, gain
    assert logits["aligned"] > logits["plain"] + 2.0, logits


def test_pot_alignment_leaves_free_scale_grids_and_bare_relu6_alone():
    """A uniform (free-scale) activation grid gains nothing from alignment: such pairs are reported as skipped
    and nothing changes; a ReLU6 pair is aligned only once CLE turned the ReLU6 into a clamp."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(4, 3, 8, 8)
    q = quantize(net, Recipe(method="uniform", per_channel=False, first_last="same", fold_bn=True)).eval()
    before = copy.deepcopy(q.state_dict())
    rep = align_pot_activations(q, [x])
    assert rep.pairs == [] and rep.skipped == ["4"]  # the ReLU6 pair (0, 2) is not a candidate at all
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before.items())
    q = quantize(net, Recipe(method="qcode", per_channel=False, first_last="same", fold_bn=True)).eval()
    assert [p for p, _ in align_pot_activations(q, [x]).pairs] == ["2"]
    q = quantize(net, Recipe(method="qcode", per_channel=False, first_last="same", fold_bn=True,
                             ptq={"equalize": True})).eval()
    assert [p for p, _ in align_pot_activations(q, [x]).pairs] == ["0", "2"]
    with pytest.raises(ValueError, match="calib_batches is empty"):
        align_pot_activations(quantize(net, Recipe(method="qcode", fold_bn=True)).eval(), [])

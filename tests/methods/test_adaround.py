"""AdaRound / BRECQ / QDrop learned rounding (qcnn.methods.adaround): the final rounding is hard and on the
quantizer's grid, it reconstructs a layer (and a network) better than nearest rounding on held-out data, the
blocks of a ResNet are found, and bad input is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qcnn.methods import quantize
from qcnn.methods.adaround import adaround, block_groups
from qcnn.methods.ptq import calibrate_with_histograms
from qcnn.quant.fixed_point import FixedPointQuantizer
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe


def _images(n, c=4, hw=8, seed=1):
    """Spatially and channel-correlated inputs (with white noise inputs nearest rounding is already optimal:
    ``E||dW x||^2 = ||dW||^2`` for ``x`` of identity covariance)."""
    z = torch.randn(n, c, hw + 4, hw + 4, generator=torch.Generator().manual_seed(seed))
    z = F.avg_pool2d(z, 5, stride=1)
    return torch.einsum("dc,nchw->ndhw", torch.eye(c) + 0.8 * torch.ones(c, c), z) + 0.3


def _batches(x, bs=32):
    return [(x[i: i + bs], torch.zeros(min(bs, len(x) - i), dtype=torch.long)) for i in range(0, len(x), bs)]


def _qmodel(model, recipe, calib):
    q = quantize(model, recipe).eval()
    calibrate_with_histograms(q, calib, record=False)
    return q


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def _layers(q):
    return [(n, m) for n, m in q.named_modules() if getattr(m, "weight_quant", None) is not None]


CONV_CASES = [
    ("uniform", 4, False),  # per-tensor 4-bit
    ("uniform", 3, True),   # per-channel 3-bit
    ("qcode", 4, False),    # power-of-two (fixed-point) 4-bit grid
]


@pytest.mark.parametrize("method,bits,per_channel", CONV_CASES)
def test_single_conv_hard_on_grid_and_better_than_nearest(method, bits, per_channel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).eval()
    recipe = Recipe(method=method, w_bits=bits, a_bits=8, first_last="same", per_channel=per_channel, fold_bn=True)
    calib, held = _batches(_images(256)), _images(256, seed=7)
    q = _qmodel(model, recipe, calib)
    nearest = _qmodel(model, recipe, calib)
    conv = q.get_submodule("0")
    w0 = conv.weight.detach().clone()
    grid0 = conv.weight_quant.grid() if method == "qcode" else None
    rep = adaround(q, model, calib, iterations=400, seed=0)

    assert rep.layers == ["0"] and rep.blocks == [["0"]]
    wq = conv.weight_quant
    grid = wq.grid()
    if method == "uniform":
        assert isinstance(wq, UniformQuantizer) and bool(wq.frozen)
        ref = UniformQuantizer(bits, dynamic=True, per_channel=per_channel)
        ref(w0)
        assert torch.equal(grid.scale, ref.scale)  # the grid AdaRound used: the float weight's min/max grid
    else:
        assert isinstance(wq, FixedPointQuantizer) and torch.equal(grid.fl, grid0.fl)
    s = grid.scale.reshape(-1, 1, 1, 1) if grid.scale.dim() else grid.scale
    w = conv.weight.detach()
    assert torch.equal(wq(w), w)  # on the grid: the eval model reproduces the learned rounding
    codes = torch.round(w / s)
    assert torch.allclose(codes * s, w, rtol=0, atol=1e-6)
    step = codes - torch.floor(w0 / s)
    clipped = (codes == grid.qmin) | (codes == grid.qmax)
    assert bool(((step == 0) | (step == 1) | clipped).all())  # h ended at exactly 0 or 1
    assert bool((step[~clipped] == 1).any()) and bool((step[~clipped] == 0).any())
    nearest_codes = torch.clamp(torch.round(w0 / s), grid.qmin, grid.qmax)
    frac = float((codes != nearest_codes).double().mean())
    assert frac == pytest.approx(rep.flipped["0"]) and 0.0 < frac < 0.5

    assert rep.recon_mse_learned["0"] < rep.recon_mse_nearest["0"]
    with torch.no_grad():  # independently, on held-out data
        ref_out = model(held)
        e_learned, e_nearest = _mse(q(held), ref_out), _mse(nearest(held), ref_out)
    assert e_learned < 0.6 * e_nearest, (e_learned, e_nearest)
    assert not q.training and all(p.requires_grad for p in q.parameters())


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv_a = nn.Conv2d(c, c, 3, padding=1)
        self.relu_a = nn.ReLU()
        self.conv_b = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv_b(self.relu_a(self.conv_a(x))) + x)


class _Net(nn.Module):
    """stem conv, one residual block of two convs, linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = _Block(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.block(self.relu(self.bn(self.stem(x)))))))


def _net():
    torch.manual_seed(3)
    net = _Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


W3A8 = Recipe(method="uniform", w_bits=3, a_bits=8, first_last="same", per_channel=True, fold_bn=True)


def test_small_cnn_end_to_end_layer_block_qdrop():
    model = _net()
    calib, held = _batches(_images(256, c=3)), _images(256, c=3, seed=9)
    with torch.no_grad():
        ref = model(held)
        e_nearest = _mse(_qmodel(model, W3A8, calib)(held), ref)
    assert block_groups(_qmodel(model, W3A8, calib)) == {
        "stem": ["stem"], "block": ["block.conv_a", "block.conv_b"], "fc": ["fc"]}
    errs, states = {}, {}
    for key, kw in {"layer": {}, "block": {"mode": "block"}, "qdrop": {"mode": "block", "drop_prob": 0.5},
                    "qdrop2": {"mode": "block", "drop_prob": 0.5}}.items():
        q = _qmodel(model, W3A8, calib)
        rep = adaround(q, model, calib, iterations=300, **kw)
        assert rep.units == (["stem", "block", "fc"] if key != "layer" else ["stem", "block.conv_a", "block.conv_b",
                                                                              "fc"])
        for name, m in _layers(q):
            assert torch.equal(m.weight_quant(m.weight), m.weight), name
        with torch.no_grad():
            errs[key] = _mse(q(held), ref)
        states[key] = {k: v.clone() for k, v in q.state_dict().items()}
        fresh = quantize(model, W3A8).eval()  # a checkpoint rebuilds the learned rounding (frozen grids)
        fresh.load_state_dict(q.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh(held), q(held))
    for key in ("layer", "block", "qdrop"):
        assert errs[key] < 0.8 * e_nearest, (key, errs, e_nearest)
    assert errs["qdrop"] == errs["qdrop2"]  # deterministic by seed
    assert all(torch.equal(v, states["qdrop2"][k]) for k, v in states["qdrop"].items())
    assert not all(torch.equal(v, states["block"][k]) for k, v in states["qdrop"].items())  # the drop acts


def test_float_reference_defaults_to_the_quantized_models_weights():
    model = _net()
    calib = _batches(_images(64, c=3))
    a, b = _qmodel(model, W3A8, calib), _qmodel(model, W3A8, calib)
    adaround(a, model, calib, iterations=30)  # BN-unfolded float model: folded internally
    adaround(b, None, calib, iterations=30)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_rounding_is_decided_on_a_large_map_with_a_short_schedule():
    """The reconstruction term is BRECQ's (summed over channels, averaged over positions) and the default step
    follows the schedule: on a 48x48 map, 200 iterations leave few rounding variables undecided, so the hard
    rounding keeps what the soft one learned. (Summed over all C H W elements, the term outweighed the
    regulariser 2304x here; with a fixed 4e-3 step most ``h`` ended inside (0.01, 0.99).)"""
    from qcnn.methods.adaround import default_lr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).eval()
    recipe = Recipe(method="uniform", w_bits=4, a_bits=8, first_last="same", per_channel=True, fold_bn=True)
    calib, held = _batches(_images(16, hw=48), bs=8), _images(16, hw=48, seed=7)
    q, nearest = _qmodel(model, recipe, calib), _qmodel(model, recipe, calib)
    rep = adaround(q, model, calib, iterations=200, seed=0)
    assert rep.undecided["0"] <= 0.1, rep.undecided
    assert default_lr(200) == pytest.approx(0.05) and default_lr(5000) == pytest.approx(4e-3)
    with torch.no_grad():
        ref = model(held)
        assert _mse(q(held), ref) < 0.9 * _mse(nearest(held), ref)


def test_activation_steps_learned_with_the_rounding_beat_calibrated_ones():
    """``act_lr``: min/max-calibrated 3-bit activation steps are too coarse; learned jointly with the rounding
    (LSQ gradient) they shrink, are written into the quantizers (a checkpoint keeps them) and lower the
    held-out output error against learned rounding alone; power-of-two grids keep their steps."""
    from qcnn.methods.adaround import LearnedActStep

    model = _net()
    recipe = Recipe(method="uniform", w_bits=4, a_bits=3, first_last="same", per_channel=True, fold_bn=True,
                    calib="minmax")
    calib, held = _batches(_images(256, c=3)), _images(256, c=3, seed=9)
    with torch.no_grad():
        ref = model(held)
    errs = {}
    for lr in (0.0, 1e-3):
        q = _qmodel(model, recipe, calib)
        before = {n: float(m.scale) for n, m in q.named_modules() if n.endswith("input_quant")}
        rep = adaround(q, model, calib, iterations=300, act_lr=lr)
        with torch.no_grad():
            errs[lr] = _mse(q(held), ref)
        if not lr:
            assert rep.act_steps == {}
            continue
        assert set(rep.act_steps) == set(before)  # the four layers' inputs (the add is in no layer unit)
        for name, (b, a) in rep.act_steps.items():
            assert b == pytest.approx(before[name]) and a == pytest.approx(float(q.get_submodule(name).scale))
            assert 0.4 * b < a < 0.95 * b, (name, b, a)
        fresh = quantize(model, recipe).eval()
        fresh.load_state_dict(q.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh(held), q(held))
    assert errs[1e-3] < 0.8 * errs[0.0], errs
    # the stand-in starts as the calibrated quantizer (zero point kept), and its step gradient is LSQ's
    q = _qmodel(model, recipe, calib)
    inner = q.stem.input_quant
    x = held[:4]
    stand_in = LearnedActStep(inner)
    assert int(inner.zero_point) != 0 and torch.allclose(stand_in(x), inner(x), atol=1e-6)
    stand_in(x).sum().backward()
    s, z = float(inner.scale), float(inner.zero_point)
    v = x / s + z
    expect = torch.where(v < inner.qmin, inner.qmin - z, torch.where(v > inner.qmax, inner.qmax - z, v.round() - v))
    assert float(stand_in.step.grad) == pytest.approx(float(expect.sum()), rel=1e-4)
    qc = _qmodel(model, Recipe(method="qcode", w_bits=4, a_bits=4, first_last="same", fold_bn=True), calib)
    assert adaround(qc, model, calib, iterations=5, act_lr=1e-3).act_steps == {}


def test_resnet20_w4a8_real_cifar(cifar_zip, weights_dir):
    from qcnn.data import get_data
    from qcnn.models import build_model, load_weights

    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=64, augment=False, calib_size=64, test_limit=128)
    calib, test = list(bundle.calib), torch.cat([x for x, _ in bundle.test])
    model = load_weights(build_model("resnet20"), weights_dir / "resnet20-12fca82f.th").eval()
    recipe = Recipe(method="uniform", w_bits=4, a_bits=8, first_last="same", per_channel=True, fold_bn=True)
    q = _qmodel(model, recipe, calib)
    groups = block_groups(q)
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert list(groups) == ["conv1", *blocks, "linear"]
    assert all(groups[b] == [f"{b}.conv1", f"{b}.conv2"] for b in blocks)
    with torch.no_grad():
        ref = model(test)
        e_nearest = _mse(q(test), ref)
    rep = adaround(q, model, calib, iterations=200, batch_size=16)
    with torch.no_grad():
        e_learned = _mse(q(test), ref)
    assert len(rep.layers) == 20 and e_learned < 0.8 * e_nearest, (e_learned, e_nearest)
    assert all(torch.equal(m.weight_quant(m.weight), m.weight) for _, m in _layers(q))
    # block mode on the same data: the 11 units, each better than nearest rounding on its own output
    qb = _qmodel(model, recipe, calib)
    rb = adaround(qb, model, calib, mode="block", iterations=100, batch_size=16)
    assert rb.units == ["conv1", *blocks, "linear"] and rb.blocks == list(groups.values())
    with torch.no_grad():
        assert _mse(qb(test), ref) < e_nearest


def test_bad_input():
    model = _net()
    calib = _batches(_images(32, c=3))
    q = _qmodel(model, W3A8, calib)
    with pytest.raises(ValueError, match="'x'"):
        adaround(q, model, calib, mode="x")
    with pytest.raises(ValueError, match="iterations=0"):
        adaround(q, model, calib, iterations=0)
    with pytest.raises(ValueError, match="drop_prob=1.0"):
        adaround(q, model, calib, drop_prob=1.0)
    with pytest.raises(ValueError, match="act_lr=-0.1"):
        adaround(q, model, calib, act_lr=-0.1)
    with pytest.raises(ValueError, match="empty"):
        adaround(q, model, [])
    with pytest.raises(ValueError, match="'stem'"):
        adaround(q, nn.Sequential(nn.Conv2d(3, 8, 3)), calib)  # not the model q was made from
    with pytest.raises(ValueError, match="GraphModule"):
        adaround(model, model, calib)
    with pytest.raises(ValueError, match="depth=0"):
        block_groups(q, depth=0)
    codebook = _qmodel(model, Recipe(method="nonuniform", w_bits=3, a_bits=8, first_last="same", fold_bn=True), calib)
    before = {k: v.clone() for k, v in codebook.state_dict().items()}
    with pytest.raises(ValueError, match=r"'stem'.*QuantileWeightQuantizer"):
        adaround(codebook, model, calib, iterations=5)
    assert all(torch.equal(v, codebook.state_dict()[k]) for k, v in before.items())  # nothing changed

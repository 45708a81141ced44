"""Concatenation, products, lookup-table activations, permutes and ceil-mode pools on the integer engine:
bit-exact with the float64 simulation of the fake-quant model (end to end and per layer), in the engine and in
the integer ONNX form; torchvision's MobileNetV3-Small and SqueezeNet 1.0 end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import IntegerModel, add_bias_quantizers, add_residual_quantizers, to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.ir import Op
from qcnn.integer.kernels import run_op
from qcnn.integer.onnx_export import ort_codes, to_onnx
from qcnn.integer.torch_backend import to_torch_quantized
from qcnn.methods import quantize
from qcnn.nn.layers import QAct, QCat, QMul

W8A8 = {"method": "uniform", "w_bits": 8, "a_bits": 8, "first_last": "8bit", "fold_bn": True}


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def calibrated(net: nn.Module, shape, recipe: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    q = quantize(net.eval(), recipe or W8A8).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(32, *shape))
    return q


def assert_bit_exact(q: nn.Module, x: torch.Tensor, kinds: set[str] = frozenset()) -> IntegerModel:
    """The engine equals the float64 simulation code for code: end to end, per layer (each op fed the
    simulation's input codes), and its logits equal the simulation's up to float rounding. ``kinds``: op kinds
    the compiled model must hold."""
    ref64, sim64 = simulation_codes(q, x, dtype=torch.float64)
    im = to_integer(q, x)
    assert kinds <= {op.kind for op in im.ops}, {op.kind for op in im.ops}
    out, codes = im.run(x, record=True)
    assert set(codes) == set(sim64)
    cmp = compare_codes(codes, sim64)
    assert cmp["equal"] == 1.0 and cmp["max_diff"] == 0 and cmp["points"] == len(sim64), cmp
    _, forced = im.run(x, force=sim64, record=True)
    cmp = compare_codes(forced, sim64)
    assert cmp["equal"] == 1.0 and cmp["max_diff"] == 0, cmp
    assert torch.allclose(out.double(), ref64, rtol=1e-5, atol=1e-5 * float(ref64.abs().max()))
    return im


def _live(codes: torch.Tensor, at_least: int = 16) -> bool:
    """The codes use many grid levels (the test is not passing on a constant tensor)."""
    return codes.unique().numel() >= at_least


# -- concatenation -------------------------------------------------------------------------------------------
class Branches(nn.Module):
    """Two branches on different grids (a ReLU'd conv accumulator, a BN'd signed one) concatenated, then a
    third operand that already is codes (a Hardswish output) concatenated to that."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.bn = _bn(5)
        self.c = nn.Conv2d(8, 3, 3, padding=1)
        self.act = nn.Hardswish()
        self.head = nn.Conv2d(14, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([F.relu(self.a(x)), self.bn(self.b(x))], dim=1)
        y = torch.cat((y, self.act(self.c(x))), -3)
        return self.fc(F.adaptive_avg_pool2d(self.head(y), 1).flatten(1))


@pytest.mark.parametrize("fold_bn", [True, False])
def test_concat_requantizes_every_branch_to_the_output_grid(fold_bn):
    q = calibrated(Branches(), (3, 12, 12), {**W8A8, "fold_bn": fold_bn})
    cats = [m for m in q.modules() if isinstance(m, QCat)]
    assert len(cats) == 2 and all(c.out_quant is not None for c in cats)
    x = torch.randn(6, 3, 12, 12)
    im = assert_bit_exact(q, x, {"concat", "lut"})
    concat = [op for op in im.ops if op.kind == "concat"]
    assert [op.attrs["dim"] for op in concat] == [1, 1]
    producers = {op.output: op for op in im.ops}
    # every operand is codes on the concat grid: requantized (accumulators, codes of other grids), or already there
    for op in concat:
        assert all(producers[i].attrs["grid"] == op.attrs["grid"] for i in op.inputs)
        assert all(producers[i].kind in ("requant", "concat") for i in op.inputs)
        assert sum(producers[i].kind == "requant" for i in op.inputs) >= 1
    _, codes = im.run(x, record=True)
    assert _live(codes["qcat_1.out_quant"])


# -- squeeze-excitation: sigmoid / hardsigmoid gate and product ----------------------------------------------
class SE(nn.Module):
    """Conv -> activation (ReLU: the product reads an accumulator; Hardswish: codes) -> squeeze-excitation with
    a gate, the gated product read by a conv and a residual add."""

    def __init__(self, act: str, gate: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU() if act == "relu" else nn.Hardswish()
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.gate = nn.Sigmoid() if gate == "sigmoid" else nn.Hardsigmoid()
        self.proj = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.act(self.conv(x))
        s = self.gate(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        y = s * x
        y = self.proj(y) + y
        return self.fc(torch.mean(y, dim=(2, 3)))


@pytest.mark.parametrize("act", ["relu", "hardswish"])
@pytest.mark.parametrize("gate", ["sigmoid", "hardsigmoid"])
def test_squeeze_excitation_product_is_bit_exact(act, gate):
    q = calibrated(SE(act, gate), (3, 10, 10))
    muls = [m for m in q.modules() if isinstance(m, QMul)]
    assert len(muls) == 1
    # an operand that is not codes yet (a ReLU'd conv accumulator) gets its own quantizer (an identity QAct)
    plain = [n for n, m in q.named_modules() if isinstance(m, QAct) and m.act is None]
    assert len(plain) == (1 if act == "relu" else 0), plain
    x = torch.randn(6, 3, 10, 10)
    im = assert_bit_exact(q, x, {"mul", "lut", "add"})
    mul = next(op for op in im.ops if op.kind == "mul")
    assert {op.kind for op in im.ops if op.inputs and op.inputs[0] == mul.output} == {"requant"}
    _, codes = im.run(x, record=True)
    assert _live(codes["qmul_0.out_quant"]) and _live(codes["gate.out_quant"], 8)


# -- lookup-table activations --------------------------------------------------------------------------------
#: name -> (module factory, function)
_ACTS = {"hardswish": (nn.Hardswish, F.hardswish), "hardsigmoid": (nn.Hardsigmoid, F.hardsigmoid),
         "silu": (nn.SiLU, F.silu), "sigmoid": (nn.Sigmoid, torch.sigmoid), "tanh": (nn.Tanh, torch.tanh),
         "leaky_relu": (lambda: nn.LeakyReLU(0.1), lambda x: F.leaky_relu(x, 0.1))}


class Activated(nn.Module):
    """conv (-> BN) -> activation (function or module) -> conv, residual add -> the same activation (module),
    which then reads codes (the add's output): no input quantizer of its own."""

    def __init__(self, name: str, functional: bool, bn: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=not bn)
        self.bn = _bn(6) if bn else nn.Identity()
        self.act0 = None if functional else _ACTS[name][0]()
        self.fn = _ACTS[name][1] if functional else None
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = _ACTS[name][0]()
        self.fc = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        y = self.fn(y) if self.fn is not None else self.act0(y)
        y = self.act(self.conv2(y) + y)
        return self.fc(torch.flatten(y, 1))


_FQN4 = {"method": "fqn", "w_bits": 4, "a_bits": 4, "first_last": "same"}


@pytest.mark.parametrize("name", sorted(_ACTS))
@pytest.mark.parametrize("functional,bn,recipe", [(False, False, W8A8), (True, True, {**W8A8, "fold_bn": False}),
                                                  (True, True, W8A8), (False, True, _FQN4)])
def test_activation_lookup_tables_are_bit_exact(name, functional, bn, recipe):
    q = calibrated(Activated(name, functional, bn), (3, 8, 8), recipe)
    acts = {n: m for n, m in q.named_modules() if isinstance(m, QAct)}
    first = "qact_0" if functional else "act0"  # a module is wrapped under its own name
    assert set(acts) == {first, "act"}
    assert acts[first].input_quant is not None and acts["act"].input_quant is None  # it reads the add's codes
    x = torch.randn(8, 3, 8, 8)
    im = assert_bit_exact(q, x, {"lut", "add"})
    luts = [op for op in im.ops if op.kind == "lut"]
    assert len(luts) == 2 and {op.attrs["function"] for op in luts} == {type(_ACTS[name][0]()).__name__}
    if name == "leaky_relu":  # the slope of the call (F.leaky_relu(x, 0.1)) or of the module
        assert {m.act.negative_slope for m in acts.values()} == {0.1}
    for op in luts:
        g = op.attrs["input_grid"]
        assert op.tensors["table"].numel() == g["qmax"] - g["qmin"] + 1
        assert op.tensors["table"].unique().numel() >= 16  # a real function of the input codes
    _, codes = im.run(x, record=True)
    assert _live(codes["act.out_quant"]) and _live(codes[f"{first}.out_quant"])


class LeakySlopes(nn.Module):
    """F.leaky_relu with the slope as a keyword, with the default slope, in place; an in-place module."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 6, 3, padding=1)
        self.act = nn.LeakyReLU(0.05, inplace=True)
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        y = F.leaky_relu(self.c1(x), negative_slope=0.2)
        y = F.leaky_relu(self.c2(y))
        y = self.act(F.leaky_relu(self.c3(y), 0.3, inplace=True) + y)
        return self.fc(torch.flatten(y, 1))


def test_leaky_relu_tables_keep_the_slope_of_each_call():
    q = calibrated(LeakySlopes(), (3, 8, 8))
    acts = {n: m for n, m in q.named_modules() if isinstance(m, QAct)}
    assert {n: m.act.negative_slope for n, m in acts.items()} == {"qact_0": 0.2, "qact_1": 0.01, "qact_2": 0.3,
                                                                   "act": 0.05}
    assert not any(m.act.inplace for m in acts.values())  # each reads a quantizer's output
    assert acts["act"].input_quant is None  # it reads the add's codes
    x = torch.randn(6, 3, 8, 8)
    im = assert_bit_exact(q, x, {"lut", "add"})
    assert [op.attrs["function"] for op in im.ops if op.kind == "lut"] == ["LeakyReLU"] * 4
    with pytest.raises(ValueError, match="leaky relu 'leaky_relu' .*quantize_adds=True"):
        to_integer(calibrated(LeakySlopes(), (3, 8, 8), {**W8A8, "quantize_adds": False}), x)


class TinyYolo(nn.Module):
    """A YOLO-style detector: conv-BN-LeakyReLU(0.1) x3 (an in-place module, a module, a function), one of the
    convs of stride 2, and a 1x1 conv head of 15 channels (3 anchors x (4 box + 1 objectness)) per cell."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8)
        self.a1 = nn.LeakyReLU(0.1, inplace=True)
        self.c2, self.b2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), _bn(16)
        self.a2 = nn.LeakyReLU(0.1)
        self.c3, self.b3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), _bn(16)
        self.head = nn.Conv2d(16, 15, 1)

    def forward(self, x):
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.c2(x)))
        return self.head(F.leaky_relu(self.b3(self.c3(x)), 0.1))


_PACT4 = {"method": "pact", "w_bits": 4, "a_bits": 4, "first_last": "same"}


@pytest.mark.parametrize("recipe", [_PACT4, _FQN4], ids=["pact", "fqn"])
def test_yolo_style_leaky_relu_detector_is_bit_exact_and_exports(recipe):
    q = calibrated(TinyYolo(), (3, 16, 16), recipe)
    acts = {n: m for n, m in q.named_modules() if isinstance(m, QAct)}
    assert set(acts) == {"a1", "a2", "qact_0"} and all(m.input_quant is not None for m in acts.values())
    if recipe is _PACT4:  # a conv reading a leaky relu's output sees a signed input: PACT's signed variant
        assert all(q.get_submodule(n).input_quant.signed for n in ("c2", "c3", "head"))
    x = torch.randn(4, 3, 16, 16)
    im = assert_bit_exact(q, x, {"conv", "lut"})
    assert [op.attrs["layer"] for op in im.ops if op.kind == "lut"] == ["a1", "a2", "qact_0"]
    out, codes = im.run(x, record=True)
    assert out.shape == (4, 15, 8, 8) and out.std(0).mean() > 0
    assert all(_live(codes[f"{n}.out_quant"]) for n in acts)
    logits, got = ort_codes(*to_onnx(im, with_codes=True, form="integer"), x, threads=1)
    assert compare_codes(got, codes)["equal"] == 1.0 and torch.equal(logits, out)
    _, sim64 = simulation_codes(q, x, dtype=torch.float64)
    for form in ("qdq", "qlinear") if recipe is _PACT4 else ("qdq",):  # FQN's weights are asymmetric
        model, names = to_onnx(im, with_codes=True, forced=True, form=form)  # the head's conv stays float
        _, per_layer = ort_codes(model, names, x, force=sim64, threads=1)
        cmp = compare_codes(per_layer, sim64)  # float32 requantization, int32 bias: within one LSB
        assert cmp["points"] == len(sim64) and cmp["max_diff"] <= 1, (form, cmp)


def test_pact_unsigned_variant_after_leaky_relu():
    q = calibrated(TinyYolo(), (3, 16, 16), {**_PACT4, "params": {"signed_variant": False}})
    assert not any(q.get_submodule(n).input_quant.signed for n in ("c2", "c3", "head"))
    assert_bit_exact(q, torch.randn(4, 3, 16, 16), {"lut"})


# -- moves, global pooling, ceil-mode max pools --------------------------------------------------------------
class Moves(nn.Module):
    """Permute / transpose and flatten before a linear, a ceil-mode max pool, global pooling heads."""

    def __init__(self, head: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)  # 9x9 -> 4x4 (floor mode: 4x4 too), 4x4 -> 2x2 (floor: 1x1)
        self.conv2 = nn.Conv2d(6, 5, 1)
        self.head = head
        self.fc = nn.Linear(5 * 4 * 4 if head == "permute" else 5, 3)

    def forward(self, x):
        y = self.pool(F.relu(self.conv(x)))
        y = self.conv2(y)
        if self.head == "permute":
            return self.fc(torch.flatten(y.permute(0, 2, 3, 1), 1))
        if self.head == "transpose":
            y = torch.transpose(self.pool(y), 1, 3).transpose(1, 2)  # N, H, W, C
            return self.fc(torch.flatten(F.max_pool2d(y.permute((0, 3, 1, 2)), 2), 1))
        if self.head == "mean":
            return self.fc(torch.mean(F.relu(y), (2, 3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(y), 1), 1))


@pytest.mark.parametrize("head", ["permute", "transpose", "mean", "adaptive"])
def test_permute_flatten_and_global_pooling_move_codes(head):
    q = calibrated(Moves(head), (3, 9, 9))
    x = torch.randn(6, 3, 9, 9)
    kinds = {"permute": {"permute", "reshape"}, "transpose": {"permute", "reshape"}, "mean": {"sumpool"},
             "adaptive": {"sumpool"}}[head]
    im = assert_bit_exact(q, x, kinds | {"maxpool"})
    pools = [op for op in im.ops if op.kind == "maxpool"]
    assert pools[0].attrs["ceil_mode"] is True
    assert im.value_shapes()[pools[0].output] == (1, 6, 4, 4)
    if head == "transpose":
        assert im.value_shapes()[pools[1].output] == (1, 5, 2, 2)  # the last window starts inside: ceil mode


def test_ceil_mode_windows_match_pytorch():
    """The kernel's ceil-mode windows (extra rows of the padding value) against torch's max pool."""
    torch.manual_seed(0)
    for size, k, s, p in [(7, 3, 2, 0), (8, 3, 2, 1), (6, 2, 2, 0), (10, 3, 3, 1), (5, 4, 3, 2)]:
        x = torch.randint(-50, 50, (2, 3, size, size + 1))
        op = Op("maxpool", ["x"], "y", {"kernel": [k, k], "stride": [s, s], "padding": [p, p], "dilation": [1, 1],
                                        "ceil_mode": True})
        want = F.max_pool2d(x.double(), k, s, p, ceil_mode=True).to(torch.int64)
        assert torch.equal(run_op(op, [x], {}), want), (size, k, s, p)


# -- DenseNet / ShuffleNet / EfficientNet patterns ------------------------------------------------------------
class Dense(nn.Module):
    """DenseNet's pre-activation layers: BatchNorm -> ReLU -> conv on the concatenation of all features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.norms = nn.ModuleList([_bn(6), _bn(10), _bn(14)])
        self.convs = nn.ModuleList([nn.Conv2d(c, 4, 3, padding=1, bias=False) for c in (6, 10)])
        self.fc = nn.Linear(14, 3)
        with torch.no_grad():  # a negative BatchNorm scale: the sign path
            self.norms[2].weight[0] = -self.norms[2].weight[0]

    def forward(self, x):
        feats = [self.stem(x)]
        for norm, conv in zip(self.norms, self.convs):
            feats.append(conv(F.relu(norm(torch.cat(feats, 1)))))
        y = F.relu(self.norms[2](torch.cat(feats, 1)))
        return self.fc(F.adaptive_avg_pool2d(y, (1, 1)).flatten(1))


class Shuffle(nn.Module):
    """ShuffleNet V2's unit: chunk, branch, concatenate, channel shuffle through shape arithmetic (size items,
    floordiv, a product of sizes that must stay a Python int, not become a quantized product)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4))
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, -1, h, w)
        p, q, r = torch.split(y, [2, 4, 2], dim=1)
        y = torch.cat([r, q.split(2, 1)[1], p, q[:, :2]], 1)
        y = F.max_pool2d(y, 2)
        n, c, h, w = y.size()
        return self.fc(y.reshape(y.shape[0], c * h * w))


class MBConv(nn.Module):
    """EfficientNet's block: SiLU, squeeze-excitation with a SiLU squeeze and a sigmoid gate, stochastic depth."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.se = torchvision.ops.SqueezeExcitation(16, 4, activation=nn.SiLU)
        self.project = nn.Conv2d(16, 8, 1)
        self.drop = StochasticDepth(0.2, "row")
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.silu(self.stem(x))
        y = self.project(self.se(F.silu(self.dw(F.silu(self.expand(x))))))
        y = self.drop(y)
        y += x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("net,kinds", [(Dense, {"concat", "affine"}), (Shuffle, {"concat", "getitem", "permute"}),
                                       (MBConv, {"lut", "mul", "add"})])
@pytest.mark.parametrize("fold_bn", [True, False])
def test_densenet_shufflenet_efficientnet_patterns_are_bit_exact(net, kinds, fold_bn):
    q = calibrated(net(), (3, 12, 12), {**W8A8, "fold_bn": fold_bn})
    assert not any(isinstance(m, QMul) for m in q.modules()) or net is MBConv  # c * h * w stays an int
    x = torch.randn(6, 3, 12, 12)
    im = assert_bit_exact(q, x, kinds)
    if net is Dense:
        affine = [op for op in im.ops if op.kind == "affine"]
        assert len(affine) == 3 and int(affine[-1].tensors["sign"][0]) == -1
    _, sim64 = simulation_codes(q, x, dtype=torch.float64)
    logits, got = ort_codes(*to_onnx(im, with_codes=True, form="integer"), x, threads=1)
    assert compare_codes(got, sim64)["equal"] == 1.0 and torch.equal(logits, im(x))
    _, per_layer = ort_codes(*to_onnx(im, with_codes=True, forced=True), x, force=sim64, threads=1)  # QDQ
    cmp = compare_codes(per_layer, sim64)
    assert cmp["max_diff"] <= 1 and cmp["equal"] >= 0.99, cmp


def test_stochastic_depth_traced_in_training_mode_is_refused():
    torch.manual_seed(0)
    q = quantize(MBConv().train(), {**W8A8, "fold_bn": False})  # (fold_bn traces in eval mode)
    with torch.no_grad(), calibrating(q):
        q(torch.randn(8, 3, 12, 12))
    with pytest.raises(ValueError, match="stochastic depth .* traced in training mode"):
        to_integer(q, torch.randn(2, 3, 12, 12))


# -- torchvision networks ------------------------------------------------------------------------------------
def _tv(name: str, size: int) -> nn.Module:
    """A torchvision network with random weights whose BatchNorm statistics are estimated on random images, so
    that every layer's activations stay alive (with the default statistics the deep layers go constant)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None, num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, size, size))
    return net.eval()


@pytest.mark.parametrize("name,kinds,size", [("mobilenet_v3_small", {"lut", "mul", "add"}, 64),
                                             ("squeezenet1_0", {"concat", "maxpool"}, 64),
                                             ("shufflenet_v2_x0_5", {"concat", "permute", "getitem"}, 64)])
def test_torchvision_networks_compile_and_equal_the_float64_simulation(name, kinds, size):
    torch.manual_seed(0)
    q = quantize(_tv(name, size), W8A8).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(8, 3, size, size))
    x = torch.randn(4, 3, size, size)
    im = assert_bit_exact(q, x, kinds)
    out, codes = im.run(x, record=True)
    assert all(_live(c, 8) for c in codes.values()), min((c.unique().numel(), p) for p, c in codes.items())
    assert out.std(0).mean() > 0  # the logits depend on the image
    # the integer ONNX form runs the same codes in ONNX Runtime
    logits, got = ort_codes(*to_onnx(im, with_codes=True, form="integer"), x, threads=1)
    assert compare_codes(got, codes)["equal"] == 1.0 and torch.equal(logits, out)


# -- ONNX forms, files, refusals -----------------------------------------------------------------------------
class Mixed(nn.Module):
    """Every new op in one network whose layers each have one requantization (as the QLinear form needs)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)
        self.fc1 = nn.Conv2d(10, 4, 1)
        self.fc2 = nn.Conv2d(4, 10, 1)
        self.c2 = nn.Conv2d(10, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = F.hardswish(self.c1(x))
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        y = F.silu(self.c2(y * s))
        y = F.max_pool2d(y, 3, 2, ceil_mode=True)
        return self.fc(torch.flatten(y.permute(0, 2, 3, 1), 1))


def test_onnx_forms_of_the_new_ops():
    q = calibrated(Mixed(), (3, 16, 16))
    x = torch.randn(8, 3, 16, 16)
    im = assert_bit_exact(q, x, {"concat", "mul", "lut", "permute", "maxpool"})
    out, codes = im.run(x, record=True)
    _, sim64 = simulation_codes(q, x, dtype=torch.float64)
    logits, got = ort_codes(*to_onnx(im, with_codes=True, form="integer"), x, threads=1)
    assert compare_codes(got, sim64)["equal"] == 1.0 and torch.equal(logits, out)
    for form in ("integer", "qdq", "qlinear"):  # per layer: exact, or float32 requantization (<= 1 LSB)
        model, names = to_onnx(im, with_codes=True, forced=True, form=form)
        _, per_layer = ort_codes(model, names, x, force=sim64, threads=1)
        cmp = compare_codes(per_layer, sim64)
        assert cmp["points"] == len(sim64) and cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999, (form, cmp)
        assert cmp["equal"] == 1.0 or form != "integer"
    ops = {n.op_type for n in to_onnx(im, form="qlinear").graph.node}
    assert {"QLinearMul", "Gather", "Concat", "NhwcMaxPool", "QLinearConv"} <= ops
    # gemmlowp's int32 scheme keeps the per-layer bound on the new ops too
    _, forced = to_integer(q, x, requant="int32").run(x, force=sim64, record=True)
    cmp = compare_codes(forced, sim64)
    assert cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999, cmp


def test_new_ops_round_trip_through_the_files(tmp_path):
    q = calibrated(Mixed(), (3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    im = to_integer(q, x)
    _, js = im.save(tmp_path / "mixed")
    im2 = IntegerModel.load(js)
    assert [op.kind for op in im2.ops] == [op.kind for op in im.ops]
    assert torch.equal(im2(x), im(x))


def test_quantize_adds_names_and_counts():
    q = quantize(Mixed().eval(), W8A8)
    names = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, (QAct, QCat, QMul))}
    assert names == {"qact_0": "QAct", "qact_1": "QAct", "qact_2": "QAct", "qcat_0": "QCat", "qmul_0": "QMul"}
    assert q.get_submodule("qcat_0").dim == 1
    off = quantize(Mixed().eval(), {**W8A8, "quantize_adds": False})
    assert not any(isinstance(m, (QAct, QCat, QMul)) for m in off.modules())


def test_unquantized_tensor_ops_are_refused_with_advice():
    x = torch.randn(2, 3, 16, 16)
    q = calibrated(Mixed(), (3, 16, 16), {**W8A8, "quantize_adds": False})
    with pytest.raises(ValueError, match="hardswish.*quantize_adds=True"):
        to_integer(q, x)
    q = calibrated(SE("relu", "sigmoid"), (3, 10, 10))
    q.qact_0 = nn.Identity()  # the product now reads the ReLU'd accumulator
    with pytest.raises(ValueError, match="product 'qmul_0': operand 1 is an accumulator, not codes"):
        to_integer(q, torch.randn(2, 3, 10, 10))
    with pytest.raises(ValueError, match="'lut'"):
        to_torch_quantized(to_integer(calibrated(Activated("silu", False, False), (3, 8, 8)), torch.randn(1, 3, 8, 8)))


class PermutedPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 2, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.conv(x).permute(0, 2, 3, 1), 2), 1))


def test_pooling_a_permuted_accumulator_is_refused():
    """Windows along a permuted channel axis would compare values of different scales: refused by name."""
    q = calibrated(PermutedPool(), (3, 8, 8))
    with pytest.raises(ValueError, match="max pool 'max_pool2d': its input's scale varies over the pooled"):
        to_integer(q, torch.randn(2, 3, 8, 8))


class Stem(nn.Module):
    """torchvision ResNet's stem: conv -> ReLU -> max pool read by the first block's conv and its shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        y = F.relu(self.c2(F.relu(self.c1(x))) + x)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_qlinear_form_of_a_pooled_stem_says_what_to_do_and_the_deployment_model_exports():
    x = torch.randn(4, 3, 16, 16)
    q = calibrated(Stem(), (3, 16, 16))
    with pytest.raises(ValueError, match="add_residual_quantizers.*form='qdq'"):
        to_onnx(to_integer(q, x), form="qlinear")
    torch.manual_seed(0)
    q = quantize(Stem().eval(), W8A8).eval()
    add_residual_quantizers(q)  # reaches the stem conv through the ReLU and the max pool
    assert q.get_submodule("conv1").out_quant is not None
    add_bias_quantizers(q)
    with torch.no_grad(), calibrating(q):
        q(torch.randn(32, 3, 16, 16))
    im = assert_bit_exact(q, x, {"maxpool", "add"})
    out, codes = im.run(x, record=True)
    logits, got = ort_codes(*to_onnx(im, with_codes=True, form="qlinear"), x, threads=1)
    cmp = compare_codes(got, codes)
    assert cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999, cmp

"""Integer engine vs the fake-quant simulation: fuzzed small conv nets, real LeNet-5, errors, file round trip."""

from __future__ import annotations

import gzip
import random

import numpy as np
import pytest
import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import IntegerModel, to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.methods import quantize


class _Block(nn.Module):
    """One random block: conv (stride, padding, groups) + BN + ReLU/ReLU6, optionally residual / pooled."""

    def __init__(self, c: int, rnd: random.Random):
        super().__init__()
        self.kind = rnd.choice(["res", "dw", "group", "plain"])
        k = rnd.choice([1, 3])
        groups = {"dw": c, "group": 2 if c % 2 == 0 else 1}.get(self.kind, 1)
        stride = 1 if self.kind == "res" else rnd.choice([1, 2])
        self.conv = nn.Conv2d(c, c, k, stride=stride, padding=k // 2, groups=groups, bias=rnd.random() < 0.5)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU6() if rnd.random() < 0.4 else nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False) if self.kind == "res" else None
        self.bn2 = nn.BatchNorm2d(c) if self.kind == "res" else None
        self.pool = rnd.choice([None, nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 1, 1)])
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                if bn is not None:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.3, 0.3)
                    bn.running_mean.uniform_(-0.2, 0.2)
                    bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        if self.conv2 is not None:
            y = self.act(self.bn2(self.conv2(y)) + x)
        return self.pool(y) if self.pool is not None else y


class _RandNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rnd = random.Random(seed)
        c = rnd.choice([4, 6, 8])
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(*[_Block(c, rnd) for _ in range(rnd.randint(2, 4))])
        self.head_avg = rnd.random() < 0.5
        self.pool = nn.AdaptiveAvgPool2d(1) if self.head_avg else nn.Identity()
        self.fc = nn.Linear(c if self.head_avg else c * 16 * 16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _calibrated(model, recipe, x):
    q = quantize(model.eval(), recipe).eval()
    with torch.no_grad(), calibrating(q):
        q(x)
    return q


def fuzzed_net(seed: int, bits: int, method: str):
    """A calibrated random net (``_RandNet(seed)``) and an input batch."""
    torch.manual_seed(seed)
    net = _RandNet(seed)
    x = torch.randn(8, 3, 16, 16)
    if not net.head_avg:
        with torch.no_grad():
            net.fc = nn.Linear(net.blocks(torch.relu(net.bn(net.stem(x))))[0].numel(), 5)
    recipe = {"method": method, "w_bits": bits, "a_bits": bits, "first_last": "same",
              "fold_bn": seed % 2 == 0 and method == "uniform"}
    return _calibrated(net, recipe, torch.randn(32, 3, 16, 16)), x


def _per_layer(q, x, bias_mode="output"):
    im = to_integer(q, x, bias_mode=bias_mode)
    ref, sim = simulation_codes(q, x)
    _, forced = im.run(x, force=sim, record=True)
    return im, ref, sim, compare_codes(forced, sim)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,method", [(8, "uniform"), (4, "fqn")])
def test_fuzzed_nets_match_simulation_per_layer(seed, bits, method):
    torch.manual_seed(seed)
    net = _RandNet(seed)
    size = 16
    x = torch.randn(8, 3, size, size)
    if not net.head_avg:  # flatten head: fix the classifier input size to the feature map
        with torch.no_grad():
            feat = net.blocks(torch.relu(net.bn(net.stem(x))))
        net.fc = nn.Linear(feat[0].numel(), 5)
    recipe = {"method": method, "w_bits": bits, "a_bits": bits, "first_last": "same",
              "fold_bn": seed % 2 == 0 and method == "uniform"}
    q = _calibrated(net, recipe, torch.randn(32, 3, size, size))
    im, ref, sim, cmp = _per_layer(q, x)
    assert cmp["max_diff"] <= 1, cmp
    assert cmp["equal"] >= 0.999, cmp
    out, codes = im.run(x, record=True)
    assert set(codes) == set(sim)
    # the logits of the engine fed with the simulation's codes equal the simulation's up to float error
    forced_out, _ = im.run(x, force=sim)
    assert torch.allclose(forced_out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,method", [(8, "uniform"), (4, "fqn"), (4, "dorefa"), (2, "pact"), (8, "pact")])
def test_fuzzed_nets_equal_the_float64_simulation_end_to_end(seed, bits, method):
    """The int64 requantization reproduces the simulation evaluated in float64 code for code, end to end;
    gemmlowp's int32 form keeps the per-layer bound (<= 1 LSB, >= 99.9 %). DoReFa / PACT weights run as their
    odd integer codes (``Grid.integer_view``; 8-bit ones as int16)."""
    q, x = fuzzed_net(seed, bits, method)
    ref64, sim64 = simulation_codes(q, x, dtype=torch.float64)
    out, codes = to_integer(q, x).run(x, record=True)
    cmp = compare_codes(codes, sim64)
    assert cmp["equal"] == 1.0 and cmp["max_diff"] == 0, cmp
    assert torch.allclose(out.double(), ref64, rtol=1e-5, atol=1e-5 * float(ref64.abs().max()))
    im32 = to_integer(q, x, requant="int32")
    assert im32.meta["requant"] == "int32"
    _, forced = im32.run(x, force=sim64, record=True)
    cmp32 = compare_codes(forced, sim64)
    assert cmp32["max_diff"] <= 1 and cmp32["equal"] >= 0.999, cmp32


def test_requant_scheme_is_checked():
    q = _calibrated(_RandNet(0), {"method": "uniform", "first_last": "same"}, torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="requant='int16'"):
        to_integer(q, torch.randn(1, 3, 16, 16), requant="int16")


def test_accumulator_bias_mode_is_classic_int32():
    torch.manual_seed(0)
    net = _RandNet(1)
    x = torch.randn(16, 3, 16, 16)
    with torch.no_grad():
        net.fc = nn.Linear(net.blocks(torch.relu(net.bn(net.stem(x))))[0].numel(), 5) if not net.head_avg else net.fc
    q = _calibrated(net, {"method": "uniform", "fold_bn": True}, x)
    im, _, _, cmp = _per_layer(q, x, bias_mode="accumulator")
    assert cmp["max_diff"] <= 1
    conv = next(op for op in im.ops if op.kind == "conv")
    assert conv.tensors["bias"].dtype == torch.int32
    want = torch.round(conv.tensors["bias_real"] / conv.tensors["acc_scale"]).to(torch.int32)
    assert torch.equal(conv.tensors["bias"], want)


def test_save_load_roundtrip_int4_packed(tmp_path):
    torch.manual_seed(0)
    net = _RandNet(2)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        net.fc = nn.Linear(net.blocks(torch.relu(net.bn(net.stem(x))))[0].numel(), 5) if not net.head_avg else net.fc
    q = _calibrated(net, {"method": "fqn", "w_bits": 4, "a_bits": 4, "first_last": "same"}, x)
    im = to_integer(q, x)
    npz, js = im.save(tmp_path / "net")
    stored = np.load(npz)
    conv_id = next(i for i, op in enumerate(im.ops) if op.kind == "conv")
    w = im.ops[conv_id].tensors["weight"]
    assert stored[f"{conv_id}.weight"].dtype == np.uint8 and stored[f"{conv_id}.weight"].size == (w.numel() + 1) // 2
    im2 = IntegerModel.load(js)
    assert torch.equal(im2(x), im(x))


def test_unsupported_nodes_are_named():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(nn.functional.gelu(self.conv(x)).mean((2, 3)))  # (sigmoid: tests/integer/test_new_ops.py)

    x = torch.randn(4, 3, 8, 8)
    q = _calibrated(Bad(), {"method": "uniform", "first_last": "8bit"}, x)
    with pytest.raises(ValueError, match="gelu"):
        to_integer(q, x)
    q = _calibrated(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 2)),
                    {"method": "uniform", "first_last": "fp32"}, x)
    with pytest.raises(ValueError, match="not quantized"):
        to_integer(q, x)
    with pytest.raises(ValueError, match="GraphModule"):
        to_integer(nn.Linear(2, 2), x)


def _fashion(fashion_dir, n):
    with gzip.open(fashion_dir / "t10k-images-idx3-ubyte.gz") as f:
        imgs = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
    with gzip.open(fashion_dir / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    x = (torch.from_numpy(imgs.copy()).float() / 255 - 0.2860) / 0.3530
    return x, torch.from_numpy(labels.astype(np.int64))


def test_lenet5_fashion_integer_top1_equals_simulation(fashion_dir):
    from qcnn.models import build_model

    torch.manual_seed(0)
    x, y = _fashion(fashion_dir, 600)
    model = build_model("lenet5", num_classes=10, in_channels=1)
    # a few hundred SGD steps on the first 500 images give a non-trivial classifier in a second
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(60):
        idx = torch.arange(i * 50, i * 50 + 50) % 500
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = _calibrated(model, {"method": "uniform", "first_last": "8bit"}, x[:500])
    xt, yt = x[500:], y[500:]
    im, ref, sim, cmp = _per_layer(q, xt)
    assert cmp["equal"] >= 0.999 and cmp["max_diff"] <= 1
    out = im(xt)
    sim_top1 = (ref.argmax(1) == yt).float().mean().item() * 100
    int_top1 = (out.argmax(1) == yt).float().mean().item() * 100
    assert sim_top1 > 40  # trained: far above chance (10 %)
    assert abs(sim_top1 - int_top1) <= 1.0  # 100 images: one image is one point
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.99

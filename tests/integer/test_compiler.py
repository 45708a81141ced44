"""Compiler details: functional pooling / clamp arguments in every spelling (torch.fx normalisation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.ir import Op
from qcnn.integer.kernels import run_op
from qcnn.methods import quantize


class _Functional(nn.Module):
    """Pools and clamps as functions, arguments positional, by keyword and defaulted."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.max_pool2d(x, 2)
        x = F.hardtanh(self.c2(x), 0.0, 4.0)
        x = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        x = F.avg_pool2d(self.c3(x), 2, stride=2, padding=1)
        x = torch.max_pool2d(self.c4(x), 2, 1)
        x = F.relu6(x)
        x = F.avg_pool2d(x, kernel_size=2, divisor_override=3)
        return self.fc(x.mean((2, 3)))


class _Pool(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.kw = kw
        self.fc = nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        y = F.max_pool2d(self.conv(x), 2, **self.kw)
        return self.fc(torch.flatten(y[0] if self.kw.get("return_indices") else y, 1))


def _calibrated(net, shape):
    torch.manual_seed(0)
    q = quantize(net.eval(), {"method": "uniform", "first_last": "8bit"}).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(32, *shape))
    return q


@pytest.mark.parametrize("requant", ["int64", "int32"])
def test_functional_arguments_compile_to_the_simulation(requant):
    torch.manual_seed(1)
    q = _calibrated(_Functional(), (3, 16, 16))
    x = torch.randn(6, 3, 16, 16)
    im = to_integer(q, x, requant=requant)
    pools = [op.attrs for op in im.ops if op.kind in ("maxpool", "sumpool")]
    assert [p["kernel"] for p in pools] == [[2, 2], [3, 3], [2, 2], [2, 2], [2, 2], [2, 2]]
    assert [p["stride"] for p in pools] == [[2, 2], [1, 1], [2, 2], [1, 1], [2, 2], [2, 2]]
    assert [p["padding"] for p in pools] == [[0, 0], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0]]
    _, sim64 = simulation_codes(q, x, dtype=torch.float64)
    _, forced = im.run(x, force=sim64, record=True)
    cmp = compare_codes(forced, sim64)
    assert cmp["max_diff"] <= 1 and cmp["equal"] >= 0.999, cmp
    if requant == "int64":
        _, codes = im.run(x, record=True)
        assert compare_codes(codes, sim64)["equal"] == 1.0


@pytest.mark.parametrize("kw,match", [({"return_indices": True}, "max_pool2d_with_indices")])
def test_unsupported_pool_arguments_are_named(kw, match):  # (ceil_mode: tests/integer/test_new_ops.py)
    x = torch.randn(2, 3, 8, 8)
    q = _calibrated(_Pool(**kw), (3, 8, 8))
    with pytest.raises(ValueError, match=match):
        to_integer(q, x)


def test_unknown_operations_are_named():
    with pytest.raises(ValueError, match="unknown integer operation 'softmax'"):
        run_op(Op("softmax", ["x"], "y"), [torch.zeros(1)], {})


class _ChannelsLayerNorm(nn.Module):
    """A LayerNorm over channels written with F.layer_norm on its own weight (as torchvision's LayerNorm2d): fx
    traces into it, so the graph reads ``ln.weight`` directly."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias).permute(0, 3, 1, 2)


def test_a_traced_through_module_is_refused_by_its_name_and_function():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), _ChannelsLayerNorm(4), nn.Conv2d(4, 2, 1)).eval()
    q = quantize(net, {"method": "uniform", "w_bits": 8, "a_bits": 8, "fold_bn": True}).eval()
    with torch.no_grad(), calibrating(q):
        q(torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"^1 \(layer_norm on its '1.weight'\) is not supported by the integer "
                                         r"engine; qcnn export --onnx-form torch"):
        to_integer(q, torch.randn(2, 3, 8, 8))

"""Bi-Real models: shapes, one real-valued shortcut per binary conv, downsample path, name-compatible weights."""

from __future__ import annotations

import torch
from torch import nn

import qcnn.models.bireal  # noqa: F401  (registers the bireal_* models)
import qcnn.models.wage_nets  # noqa: F401
from qcnn.models import build_model
from qcnn.models.bireal import BiRealBlock


def _convs3x3(model):
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


def test_resnet20_layout_and_shortcuts():
    m = build_model("bireal_resnet20")
    assert len(_convs3x3(m)) == 19  # stem + 18 binary convs
    blocks = [b for b in m.modules() if isinstance(b, BiRealBlock)]
    assert len(blocks) == 9
    down = [b.downsample for b in blocks if not isinstance(b.downsample, nn.Identity)]
    assert len(down) == 2
    for d in down:  # AvgPool2 -> 1x1 conv -> BN
        assert isinstance(d[0], nn.AvgPool2d) and d[1].kernel_size == (1, 1) and isinstance(d[2], nn.BatchNorm2d)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # names match the float resnet20 for every conv, BN and the classifier
    r20 = build_model("resnet20").state_dict()
    missing = [k for k in r20 if k not in m.state_dict()]
    assert missing == []


def test_every_unit_has_a_real_shortcut():
    torch.manual_seed(0)
    blk = BiRealBlock(8, 8).eval()
    with torch.no_grad():
        for bn in (blk.bn1, blk.bn2):  # make both binary branches output 0
            bn.weight.zero_()
            bn.bias.zero_()
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(blk(x), x)  # y = BN(conv(act(x))) + x, twice


def test_resnet18_and_lenet():
    m = build_model("bireal_resnet18", num_classes=1000, width=0.125)
    assert len(_convs3x3(m)) == 16
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    le = build_model("lenet5_bireal", in_channels=1)
    assert le(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(x, nn.Hardtanh) for x in le.modules()) == 4
    wage = build_model("vgg7_wage", width=0.25)
    assert wage(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in wage.modules())

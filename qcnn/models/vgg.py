"""CIFAR VGG networks used by the quantization papers.

* ``vgg_small``: the VGG-Small of HWGQ (Cai et al., CVPR 2017) and LQ-Nets (Zhang et al., ECCV 2018):
  2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 - FC classes, each conv followed by BN and ReLU.
* ``vgg7``: the network of WAGE (Wu et al., ICLR 2018): 2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 -
  1024FC - FC classes; BN after every conv and the 1024 FC by default, ``bn=False`` leaves it out (WAGE
  itself trains without BN, with its own scaling).

``width`` scales the conv channels and the hidden FC units. The classifier input is
``512 * width * s * s`` with ``s = image_size // 8`` (4 for 32x32, 3 for 28x28).
"""

from __future__ import annotations

import torch
from torch import nn

from qcnn.models import register_model, scaled
from qcnn.models.lenet import default_image_size, image_side

_CFG = (128, 128, "M", 256, 256, "M", 512, 512, "M")


def vgg_features(in_channels: int, width: float, bn: bool, bias: bool) -> tuple[nn.Sequential, int]:
    """The VGG-7 feature stack (``_CFG``: 3x3 convs, max pools), each conv followed by BatchNorm (``bn``) and
    ReLU; returns ``(features, output channels)``."""
    layers: list[nn.Module] = []
    ch = in_channels
    for v in _CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        out = scaled(v, width)
        layers.append(nn.Conv2d(ch, out, 3, padding=1, bias=bias))
        if bn:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        ch = out
    return nn.Sequential(*layers), ch


def feature_side(image_size: int, what: str) -> int:
    """Side of the feature map after the three 2x2 poolings; a ValueError below 8 pixels."""
    if image_size // 8 < 1:
        raise ValueError(f"image_size={image_size} is too small for {what} with 3 poolings (needs >= 8)")
    return image_size // 8


class CifarVGG(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32,
                 hidden: int | None = None, bn: bool = True):
        super().__init__()
        self.features, ch = vgg_features(in_channels, width, bn=bn, bias=not bn)
        side = feature_side(image_size, "a VGG")
        self.flatten = nn.Flatten()
        head: list[nn.Module] = []
        feat = ch * side * side
        if hidden is not None:
            h = scaled(hidden, width)
            head.append(nn.Linear(feat, h, bias=not bn))
            if bn:
                head.append(nn.BatchNorm1d(h))
            head.append(nn.ReLU())
            feat = h
        head.append(nn.Linear(feat, num_classes))
        self.classifier = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size=None) -> CifarVGG:
    """VGG-Small of HWGQ / LQ-Nets: 2x128C3-MP-2x256C3-MP-2x512C3-MP-FC, BN after every conv."""
    side = default_image_size(in_channels) if image_size is None else image_side(image_size)
    return CifarVGG(num_classes, in_channels, width, side, hidden=None, bn=True)


@register_model("vgg7")
def vgg7(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size=None,
         bn: bool = True) -> CifarVGG:
    """VGG-7 of WAGE: 2x128C3-MP-2x256C3-MP-2x512C3-MP-1024FC-FC (BN by default, bn=False without)."""
    side = default_image_size(in_channels) if image_size is None else image_side(image_size)
    return CifarVGG(num_classes, in_channels, width, side, hidden=1024, bn=bn)

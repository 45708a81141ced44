"""CIFAR ResNets (He et al., "Deep Residual Learning", CVPR 2016, section 4.2): ResNet-20/32/44/56.

Depth 6n+2: a 3x3 conv with 16 channels, three stages of n BasicBlocks with 16, 32, 64 channels (stride 2
at the start of stages 2 and 3), global average pooling and a linear classifier. Shortcuts are option A of
the paper: identity, or where the shape changes a stride-2 subsample ``x[:, :, ::2, ::2]`` padded with zero
channels (no parameters). Attribute names (conv1, bn1, layer1..3 of blocks conv1/bn1/conv2/bn2, linear) match
the widely used CIFAR ResNet checkpoints, e.g. ``resnet20-12fca82f.th`` loads after stripping ``module.``.

Everything is ``torch.fx`` traceable: the residual is a plain ``out + shortcut`` (which
:func:`qcnn.methods.quantize` turns into a quantized add) and there is no data-dependent control flow.
``width`` scales the channel counts of all three stages (and the stem).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcnn.models import register_model, scaled


class ShortcutA(nn.Module):
    """Option-A shortcut: spatial subsample by ``stride`` and zero-pad channels from ``in_ch`` to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_ch} -> {out_ch})")
        self.stride = stride
        self.pad_lo = (out_ch - in_ch) // 2
        self.pad_hi = out_ch - in_ch - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut = ShortcutA(in_ch, out_ch, stride) if (stride != 1 or in_ch != out_ch) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        chans = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU()
        layers = []
        in_ch = chans[0]
        for i, ch in enumerate(chans):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_ch, ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = ch
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(chans[2], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.pool(out)))


def _make(depth: int):
    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, width)

    factory.__name__ = f"resnet{depth}"
    factory.__doc__ = f"CIFAR ResNet-{depth} with option-A shortcuts."
    return factory


resnet20 = register_model("resnet20")(_make(20))
resnet32 = register_model("resnet32")(_make(32))
resnet44 = register_model("resnet44")(_make(44))
resnet56 = register_model("resnet56")(_make(56))

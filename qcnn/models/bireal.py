"""Bi-Real networks (Liu et al., "Bi-Real Net", ECCV 2018) in their real-valued form.

Every 3x3 convolution sits in a unit with a real-valued shortcut::

    x -> act -> conv3x3 -> BN -> (+ shortcut(x))

``act`` is ``clip(-1, x, 1)`` (``nn.Hardtanh``), the activation of Bi-Real's real-valued pretraining step;
``qcnn.quantize`` with method ``bireal`` then puts sign/ApproxSign on each conv input and binary weights on
each conv, which gives the binary network ``x -> sign -> bconv -> BN -> + x``. Where the shape changes, the
shortcut is ``AvgPool2d(2) -> conv1x1 -> BN`` (real-valued). The stem convolution and the classifier are
ordinary real layers.

* ``bireal_resnet20/32/44/56`` (:class:`BiRealCifarResNet`, depth ``6n + 2``, the depths of the zoo's
  ``resnet20/32/44/56``): the CIFAR ResNet layout (16/32/64 channels, ``n`` blocks of two units per stage);
  names ``conv1, bn1, layer{1,2,3}.{i}.{conv1, bn1, conv2, bn2, downsample}, linear`` match the zoo's
  ``resnet<depth>`` so its weights transfer by name.
* ``bireal_resnet18``: the ImageNet Bi-Real-18 (7x7 stem + max-pool, 64/128/256/512, two blocks of two units
  per stage = 16 binary convs, ``fc`` classifier; names as torchvision ``resnet18`` plus ``downsample``).
* ``lenet5_bireal``: the zoo's ``lenet5`` with BN after every hidden layer and clip activations; LeNet's
  layers change shape at every step, so it has no shortcuts (a binary LeNet trained the Bi-Real way).
  Names ``conv1, bn1, conv2, bn2, fc1, bn3, fc2, bn4, fc3``: the ``lenet5`` weights transfer by name.

A network built with :func:`qcnn.models.build_model` carries the zoo arguments that rebuild it
(:func:`qcnn.models.arch_record`), so a procedure that builds one of these networks saves it under its true
architecture whatever its depth.
"""

from __future__ import annotations

import torch
from torch import nn

from qcnn.models import register_model, scaled
from qcnn.models.lenet import default_image_size, image_side, lenet_geometry


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    layers: list[nn.Module] = []
    if stride != 1:
        layers.append(nn.AvgPool2d(stride))
    layers += [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
    return nn.Sequential(*layers)


class BiRealBlock(nn.Module):
    """Two Bi-Real units: ``out = BN1(conv1(act(x))) + shortcut(x)``; ``y = BN2(conv2(act(out))) + out``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.act1 = nn.Hardtanh()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act2 = nn.Hardtanh()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = _downsample(in_ch, out_ch, stride) if (stride != 1 or in_ch != out_ch) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(self.act1(x))) + self.downsample(x)
        return self.bn2(self.conv2(self.act2(out))) + out


def _stages(in_ch: int, chans: list[int], blocks: int) -> tuple[list[nn.Sequential], int]:
    stages = []
    for i, ch in enumerate(chans):
        seq = []
        for j in range(blocks):
            seq.append(BiRealBlock(in_ch, ch, stride=2 if (i > 0 and j == 0) else 1))
            in_ch = ch
        stages.append(nn.Sequential(*seq))
    return stages, in_ch


class BiRealCifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56), got {depth}")
        chans = [scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        (self.layer1, self.layer2, self.layer3), last = _stages(chans[0], chans, (depth - 2) // 6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.bn1(self.conv1(x)))))
        return self.linear(self.flatten(self.pool(out)))


class BiRealResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        chans = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, chans[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        (self.layer1, self.layer2, self.layer3, self.layer4), last = _stages(chans[0], chans, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.maxpool(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.avgpool(out)))


class LeNet5BiReal(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int = 28):
        super().__init__()
        (c1, c2, f1, f2), pad, side = lenet_geometry(image_size, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.pool1 = nn.MaxPool2d(2)
        self.act1 = nn.Hardtanh()
        self.conv2 = nn.Conv2d(c1, c2, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool2 = nn.MaxPool2d(2)
        self.act2 = nn.Hardtanh()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.bn3 = nn.BatchNorm1d(f1)
        self.act3 = nn.Hardtanh()
        self.fc2 = nn.Linear(f1, f2)
        self.bn4 = nn.BatchNorm1d(f2)
        self.act4 = nn.Hardtanh()
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.pool1(self.bn1(self.conv1(x))))
        x = self.act2(self.pool2(self.bn2(self.conv2(x))))
        x = self.act3(self.bn3(self.fc1(self.flatten(x))))
        x = self.act4(self.bn4(self.fc2(x)))
        return self.fc3(x)


#: depths with a ``bireal_resnet<depth>`` zoo entry (those of the zoo's plain CIFAR ``resnet<depth>``)
CIFAR_DEPTHS = (20, 32, 44, 56)


def _cifar_factory(depth: int):
    name = f"bireal_resnet{depth}"

    def factory(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> BiRealCifarResNet:
        return BiRealCifarResNet(depth, num_classes, in_channels, width)

    factory.__name__ = name
    factory.__doc__ = f"Bi-Real ResNet-{depth} for CIFAR-size input (real-valued form)."
    return register_model(name)(factory)


bireal_resnet20 = _cifar_factory(20)
bireal_resnet32 = _cifar_factory(32)
bireal_resnet44 = _cifar_factory(44)
bireal_resnet56 = _cifar_factory(56)


@register_model("bireal_resnet18")
def bireal_resnet18(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0) -> BiRealResNet18:
    """Bi-Real ResNet-18 for ImageNet-size input (real-valued form)."""
    return BiRealResNet18(num_classes, in_channels, width)


@register_model("lenet5_bireal")
def lenet5_bireal(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size=None) -> LeNet5BiReal:
    """LeNet-5 for Bi-Real binarization (BN after every hidden layer, clip activations)."""
    side = default_image_size(in_channels) if image_size is None else image_side(image_size)
    return LeNet5BiReal(num_classes, in_channels, width, side)


__all__ = ["CIFAR_DEPTHS", "BiRealBlock", "BiRealCifarResNet", "BiRealResNet18", "LeNet5BiReal",
           "bireal_resnet18", "bireal_resnet20", "bireal_resnet32", "bireal_resnet44",
           "bireal_resnet56", "lenet5_bireal"]

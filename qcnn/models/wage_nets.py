"""Networks in the form WAGE trains them (Wu et al., ICLR 2018): no BatchNorm, no biases.

* ``vgg7_wage``: 2x128C3 - MP2 - 2x256C3 - MP2 - 2x512C3 - MP2 - 1024FC - FC classes, ReLU after every
  hidden layer; the layer names (``features.*``, ``classifier.*``) follow the zoo's ``vgg7``.
* ``lenet5_wage``: conv(6, 5x5) - ReLU - MP2 - conv(16, 5x5) - ReLU - MP2 - fc 120 - ReLU - fc 84 - ReLU -
  fc classes, the zoo's ``lenet5`` without BN (same layer names and padding rule).

WAGE replaces BN by its per-layer constant scale 1/alpha and initialises the weights itself
(:func:`qcnn.quant.wage.wage_init`), so the factories leave PyTorch's default init in place.
"""

from __future__ import annotations

import torch
from torch import nn

from qcnn.models import register_model, scaled
from qcnn.models.lenet import default_image_size, image_side, lenet_geometry
from qcnn.models.vgg import feature_side, vgg_features


class VGG7Wage(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32):
        super().__init__()
        self.features, ch = vgg_features(in_channels, width, bn=False, bias=False)
        side = feature_side(image_size, "VGG-7")
        self.flatten = nn.Flatten()
        h = scaled(1024, width)
        self.classifier = nn.Sequential(nn.Linear(ch * side * side, h, bias=False), nn.ReLU(),
                                        nn.Linear(h, num_classes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))


class LeNet5Wage(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int = 28):
        super().__init__()
        (c1, c2, f1, f2), pad, side = lenet_geometry(image_size, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=pad, bias=False)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, bias=False)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1, bias=False)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2, bias=False)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("vgg7_wage")
def vgg7_wage(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size=None) -> VGG7Wage:
    """VGG-7 of WAGE without BN and biases."""
    side = default_image_size(in_channels) if image_size is None else image_side(image_size)
    return VGG7Wage(num_classes, in_channels, width, side)


@register_model("lenet5_wage")
def lenet5_wage(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size=None) -> LeNet5Wage:
    """LeNet-5 without BN and biases, for WAGE."""
    side = default_image_size(in_channels) if image_size is None else image_side(image_size)
    return LeNet5Wage(num_classes, in_channels, width, side)

"""LeNet-5 with BatchNorm (LeCun et al. 1998, with BN after each convolution).

conv(6, 5x5) - BN - ReLU - maxpool 2 - conv(16, 5x5) - BN - ReLU - maxpool 2 - fc 120 - ReLU - fc 84 - ReLU
- fc classes. A 28x28 input (MNIST, Fashion-MNIST) is zero-padded by 2 in the first convolution, as in the
original network, so both 28x28 and 32x32 inputs reach the classifier as 16 x 5 x 5 (16 x 6 x 6 for 32x32).
``width`` scales the six hidden layer widths (6, 16, 120, 84).
"""

from __future__ import annotations

import torch
from torch import nn

from qcnn.models import register_model, scaled


def default_image_size(in_channels: int) -> int:
    """28 for one-channel (MNIST-like) inputs, 32 otherwise (CIFAR-like)."""
    return 28 if in_channels == 1 else 32


def image_side(image_size) -> int:
    """Side of a square image from an int or an (h, w) / (c, h, w) tuple."""
    if isinstance(image_size, int):
        return image_size
    side = tuple(image_size)[-2:]
    if len(side) != 2 or side[0] != side[1]:
        raise ValueError(f"image_size must be square, got {image_size!r}")
    return int(side[0])


def lenet_geometry(image_size: int, width: float) -> tuple[tuple[int, int, int, int], int, int]:
    """Widths (conv1, conv2, fc1, fc2), padding of conv1 and side of the last feature map of a LeNet-5
    (28x28 inputs are padded to 32x32 as in the original)."""
    pad = 2 if image_size == 28 else 0
    side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for LeNet-5 (needs >= 16)")
    return tuple(scaled(c, width) for c in (6, 16, 120, 84)), pad, side


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int = 28):
        super().__init__()
        (c1, c2, f1, f2), pad, side = lenet_geometry(image_size, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * side * side, f1)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(f1, f2)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size=None) -> LeNet5:
    """LeNet-5 with BatchNorm (28x28 inputs padded to 32x32 as in the original)."""
    side = default_image_size(in_channels) if image_size is None else image_side(image_size)
    return LeNet5(num_classes, in_channels, width, side)

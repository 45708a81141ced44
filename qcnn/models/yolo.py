"""A small YOLO-style single-stage detector with leaky ReLU (Redmon et al., YOLOv2 / tiny-YOLO family).

Backbone of 3x3 convolutions, each followed by BatchNorm and ``LeakyReLU(0.1)`` (the detectors the survey's
PACT and FQN sections speak of), downsampling by stride-2 convolutions to stride 8, and a 1x1 convolution head:

    conv 16 s1 - conv 32 s2 - conv 64 s2 - conv 64 - conv 128 s2 - conv 128 - head 1x1 (5 + classes)

``width`` scales the six hidden widths. ``forward`` returns the raw head tensor ``[N, 5 + C, H / 8, W / 8]``
(per cell: objectness logit, box offsets ``tx, ty``, log-sizes ``tw, th``, class logits): a plain CNN that
:func:`qcnn.quantize`, the integer engine and ONNX export run end to end. The loss, the decoding of boxes
and non-maximum suppression (float post-processing, outside the integer graph) are in
:mod:`qcnn.detection.yolo`; training and evaluation find them from the model's name (``yolo_tiny``).
"""

from __future__ import annotations

from torch import Tensor, nn

from qcnn.models import register_model, scaled

STRIDE = 8  #: input pixels per output cell
NEGATIVE_SLOPE = 0.1


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                         nn.LeakyReLU(NEGATIVE_SLOPE))


class TinyYOLO(nn.Module):
    """Conv-BN-LeakyReLU backbone (stride 8) and a 1x1 head of ``5 + num_classes`` maps."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c = [scaled(v, width) for v in (16, 32, 64, 64, 128, 128)]
        strides = (1, 2, 2, 1, 2, 1)
        layers, prev = [], in_channels
        for ch, s in zip(c, strides):
            layers.append(_block(prev, ch, s))
            prev = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(prev, 5 + num_classes, 1)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.head:
                nn.init.kaiming_normal_(m.weight, a=NEGATIVE_SLOPE, nonlinearity="leaky_relu")
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        nn.init.constant_(self.head.bias[0:1], -4.0)  # objectness prior ~2 %: few cells hold an object

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@register_model("yolo_tiny")
def yolo_tiny(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """The small YOLO-style detector (raw head output, stride 8); see :mod:`qcnn.detection.yolo`."""
    return TinyYOLO(num_classes, in_channels, width)

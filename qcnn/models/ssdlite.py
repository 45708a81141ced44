"""SSDlite with a MobileNetV3-Large backbone (Howard et al. 2019, section 6.3; torchvision's ``ssdlite320``).

The network is torchvision's own: ``mobilenet_v3_large`` (reduced tail, as torchvision builds it without a
pretrained backbone; BatchNorm ``eps=1e-3``), cut into :class:`~torchvision.models.detection.ssdlite.
SSDLiteFeatureExtractorMobileNet` (the C4 expansion layer, the end of the backbone and four extra blocks of
1x1 / depthwise-3x3-s2 / 1x1 convolutions with ReLU6) and :class:`~torchvision.models.detection.ssdlite.
SSDLiteHead` (per level a depthwise 3x3 conv-BN-ReLU6 and a 1x1 conv for class logits, another pair for box
offsets). Its initialisation is torchvision's. A ``96 x 96`` input gives six levels of
``6x6, 3x3, 2x2, 1x1, 1x1, 1x1`` cells, six default boxes per cell.

Unlike torchvision's ``SSD`` module, ``forward`` takes the batch tensor as it comes from the loader (no resize,
no normalisation inside) and returns the **raw head maps** of every level, the class maps first:

    ``(cls_0, ..., cls_5, reg_0, ..., reg_5)``, ``cls_l: [N, A (C + 1), H_l, W_l]``, ``reg_l: [N, 4 A, H_l, W_l]``

(``A = 6`` default boxes per cell, class 0 the background). That is a plain CNN of convolutions, Hardswish,
squeeze-excitation products and residual adds which :func:`qcnn.quantize`, the integer engine and ONNX export
run end to end. The default boxes, matching, loss and box decoding with NMS (float post-processing) are
torchvision's, driven by :class:`qcnn.detection.ssd.SSDTask`; training and evaluation find them from the
model's name (``ssdlite``). ``width`` is MobileNetV3's ``width_mult`` (it also scales the extra blocks).
The module names match torchvision's ``SSD`` (``backbone.*``, ``head.*``).
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from qcnn.models import register_model

#: aspect ratios of the default boxes per level (torchvision's ssdlite320: 2 squares + 1:2, 2:1, 1:3, 3:1)
ASPECT_RATIOS = tuple((2, 3) for _ in range(6))
LEVELS = len(ASPECT_RATIOS)


def _norm():
    return partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class SSDLite(nn.Module):
    """MobileNetV3-Large SSDlite feature extractor and head returning the raw per-level maps (see module doc)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        from torchvision.models import mobilenet_v3_large
        from torchvision.models.detection.ssdlite import SSDLiteFeatureExtractorMobileNet, SSDLiteHead, _normal_init

        norm = _norm()
        net = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=True, width_mult=width)
        _normal_init(net)
        features = net.features
        if in_channels != 3:
            first = features[0][0]
            features[0][0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride,
                                       first.padding, bias=False)
            _normal_init(features[0][0])
        # the strided blocks start the stages; C4 is the last of them (torchvision's _mobilenet_extractor)
        strided = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
        self.backbone = SSDLiteFeatureExtractorMobileNet(features, strided[-1], norm, width_mult=width)
        c4 = features[strided[-1]].block[0].out_channels
        last = features[-1].out_channels
        depth = [max(16, int(d * width)) for d in (512, 256, 256, 128)]
        channels = [c4, last, *depth]
        anchors = [2 + 2 * len(r) for r in ASPECT_RATIOS]
        self.head = SSDLiteHead(channels, anchors, num_classes + 1, norm)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        feats = list(self.backbone(x).values())
        cls = [m(f) for m, f in zip(self.head.classification_head.module_list, feats)]
        reg = [m(f) for m, f in zip(self.head.regression_head.module_list, feats)]
        return tuple(cls + reg)


@register_model("ssdlite")
def ssdlite(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """torchvision's SSDlite (MobileNetV3-Large) returning raw head maps; see :mod:`qcnn.detection.ssd`."""
    return SSDLite(num_classes, in_channels, width)

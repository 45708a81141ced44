"""torchvision classifiers as ``tv:<name>`` (e.g. ``tv:resnet18``, ``tv:mobilenet_v2``).

The model is built by ``torchvision.models.get_model(name)`` without any download; pretrained weights come
from a local file (``weights=``, loaded with ``weights_only=True``). When ``num_classes`` differs from the
class count of the file (1000 for ImageNet weights), the weights are loaded into the original classifier
and the last ``Linear`` layer is then replaced by a freshly initialised one with ``num_classes`` outputs.
``in_channels != 3`` replaces the first convolution (pretrained filters are averaged over the input
channels). ``width`` is passed as ``width_mult`` to the models that have it (MobileNetV2 / V3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qcnn.io import load_torch
from qcnn.models.weights import extract_state_dict, load_state_dict_checked
from qcnn.transform import set_module


def _last(model: nn.Module, cls: type[nn.Module]) -> tuple[str, nn.Module] | None:
    found = None
    for name, m in model.named_modules():
        if isinstance(m, cls):
            found = (name, m) if cls is nn.Linear or found is None else found
    return found


def build_torchvision(name: str, num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                      weights: str | Path | None = None, **kw) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision classifier {name!r}; choose one of {available}")
    builder = torchvision.models.get_model_builder(name)
    if width != 1.0:
        try:
            builder(weights=None, width_mult=width)
        except TypeError:
            raise ValueError(f"torchvision model {name!r} has no width multiplier; width={width} is not "
                             "supported") from None
        kw["width_mult"] = width
    if weights is None:
        model = builder(weights=None, num_classes=num_classes, **kw)
    else:
        source = f"checkpoint {str(weights)!r}"
        sd = extract_state_dict(load_torch(weights), source)
        model = builder(weights=None, **kw)  # original class count, to take the file as it is
        last = _last(model, nn.Linear)
        file_classes = sd[f"{last[0]}.weight"].shape[0] if last and f"{last[0]}.weight" in sd else None
        if file_classes is not None and file_classes != last[1].out_features:
            model = builder(weights=None, num_classes=file_classes, **kw)
            last = _last(model, nn.Linear)
        load_state_dict_checked(model, sd, source)
        if last is not None and last[1].out_features != num_classes:
            set_module(model, last[0], nn.Linear(last[1].in_features, num_classes))
    if in_channels != 3:
        first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError(f"torchvision model {name!r} has no Conv2d to adapt to in_channels={in_channels}")
        n, conv = first
        new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups if conv.groups == 1 else in_channels, conv.bias is not None)
        if weights is not None and conv.groups == 1:
            with torch.no_grad():
                new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight))
        set_module(model, n, new)
    return model

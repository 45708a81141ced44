"""Model zoo: a registry of CIFAR / MNIST-sized CNNs plus every torchvision classifier.

>>> from qcnn.models import build_model, list_models
>>> model = build_model("resnet20", num_classes=10, weights="../shared/data/weights/resnet20-12fca82f.th")
>>> model = build_model("tv:mobilenet_v2", num_classes=1000, weights=".../mobilenet_v2-b0353104.pth")

Every zoo factory has the signature ``(num_classes=10, in_channels=3, width=1.0, **kw)``; ``width`` scales
the hidden channel counts (WRPN trains 2x / 3x wide networks). ``tv:<name>`` builds the torchvision model
``<name>`` (see :mod:`qcnn.models.tv`). All models are traceable by ``torch.fx`` (residual adds are plain
``a + b``), which :func:`qcnn.transform.quantize` relies on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from torch import nn

from qcnn.models.weights import extract_state_dict, load_state_dict_checked, load_weights

MODELS: dict[str, Callable[..., nn.Module]] = {}
TV_PREFIX = "tv:"


def register_model(name: str):
    """Decorator registering a factory ``(num_classes=10, in_channels=3, width=1.0, **kw) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS and MODELS[name] is not fn:
            raise ValueError(f"model {name!r} registered twice")
        if name.startswith(TV_PREFIX):
            raise ValueError(f"model names starting with {TV_PREFIX!r} are reserved for torchvision")
        MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Names of the registered zoo models (torchvision models are reached as ``tv:<name>``)."""
    return sorted(MODELS)


def model_accepts(name: str, arg: str) -> bool:
    """Whether the factory of ``name`` takes keyword ``arg`` (e.g. ``image_size``)."""
    if name.startswith(TV_PREFIX):
        return arg in ("weights",)
    fn = _factory(name)
    return arg in inspect.signature(fn).parameters


def _factory(name: str) -> Callable[..., nn.Module]:
    if name not in MODELS:
        raise ValueError(
            f"unknown model {name!r}; choose one of {list_models()} or 'tv:<torchvision name>' (e.g. tv:resnet18)"
        )
    return MODELS[name]


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                weights: str | Path | None = None, **kw) -> nn.Module:
    """Build zoo model ``name`` (or ``tv:<torchvision name>``), optionally loading ``weights`` (a file).

    ``weights`` accepts anything :func:`load_weights` does; keys must match exactly (a checkpoint of
    another architecture is refused with the offending keys named).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    if name.startswith(TV_PREFIX):
        from qcnn.models.tv import build_torchvision

        return build_torchvision(name[len(TV_PREFIX):], num_classes=num_classes, in_channels=in_channels,
                                 width=width, weights=weights, **kw)
    model = _factory(name)(num_classes=num_classes, in_channels=in_channels, width=width, **kw)
    if weights is not None:
        load_weights(model, weights)
    return model


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to an integer, at least 1."""
    return max(1, int(round(channels * width)))


# zoo modules register themselves on import (kept at the bottom: they import register_model)
from qcnn.models import bireal, lenet, resnet_cifar, vgg, wage_nets  # noqa: E402, F401

__all__ = ["MODELS", "build_model", "extract_state_dict", "list_models", "load_state_dict_checked",
           "load_weights", "model_accepts", "register_model", "scaled"]

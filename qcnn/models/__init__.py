"""Model zoo: a registry of CIFAR / MNIST-sized CNNs plus every torchvision classifier.

>>> from qcnn.models import build_model, list_models
>>> model = build_model("resnet20", num_classes=10, weights="../shared/data/weights/resnet20-12fca82f.th")
>>> model = build_model("tv:mobilenet_v2", num_classes=1000, weights=".../mobilenet_v2-b0353104.pth")

Every zoo factory has the signature ``(num_classes=10, in_channels=3, width=1.0, **kw)``; ``width`` scales
the hidden channel counts (WRPN trains 2x / 3x wide networks). ``tv:<name>`` builds the torchvision model
``<name>`` (see :mod:`qcnn.models.tv`). All models are traceable by ``torch.fx`` (residual adds are plain
``a + b``), which :func:`qcnn.methods.quantize` relies on.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path

from torch import nn

from qcnn.models.weights import extract_state_dict, load_state_dict_checked, load_weights

MODELS: dict[str, Callable[..., nn.Module]] = {}
TV_PREFIX = "tv:"
#: attribute under which every model :func:`build_model` returns carries its architecture record
ARCH_ATTR = "arch_record"


def record_arch(model: nn.Module, name: str, num_classes: int, in_channels: int, width: float,
                **kwargs) -> nn.Module:
    """``model`` carrying the record with which ``build_model(name, num_classes, in_channels, width, **kwargs)``
    rebuilds it: ``{"name", "num_classes", "in_channels", "width", "kwargs"}``, the ``arch`` of a
    ``qcnn-model/1`` file (an attribute, not part of the state_dict; :func:`qcnn.methods.quantize` keeps it)."""
    setattr(model, ARCH_ATTR, {"name": name, "num_classes": int(num_classes), "in_channels": int(in_channels),
                               "width": float(width), "kwargs": dict(kwargs)})
    return model


def arch_record(model: nn.Module) -> dict | None:
    """A copy of the architecture record of ``model`` (None for a model not built by :func:`build_model`)."""
    rec = getattr(model, ARCH_ATTR, None)
    if rec is None and isinstance(getattr(model, "meta", None), dict):  # a torch.fx GraphModule
        rec = model.meta.get(ARCH_ATTR)
    return None if rec is None else {**rec, "kwargs": dict(rec["kwargs"])}


def keep_arch(model: nn.Module, record: dict | None) -> nn.Module:
    """Give ``model`` (e.g. the GraphModule traced from a recorded model) the architecture ``record``; on a
    GraphModule it also goes into ``meta``, which ``copy.deepcopy`` keeps (plain attributes it drops)."""
    if record is not None:
        setattr(model, ARCH_ATTR, record)
        if isinstance(getattr(model, "meta", None), dict):
            model.meta[ARCH_ATTR] = record
    return model


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
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    for key, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width < math.inf:
        raise ValueError(f"width must be a positive number, got {width!r}")
    if name.startswith(TV_PREFIX):
        model = build_torchvision(name[len(TV_PREFIX):], num_classes=num_classes, in_channels=in_channels,
                                  width=width, weights=weights, **kw)
        return record_arch(model, name, num_classes, in_channels, width, **kw)
    fn = _factory(name)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kw) - set(params))
        if bad:  # e.g. the arch kwargs of a checkpoint: a TypeError deep in the factory would not say so
            options = sorted(set(params) - {"num_classes", "in_channels", "width"})
            raise ValueError(f"model {name!r} has no option(s) {bad}; its options: {options or 'none'}")
    model = fn(num_classes=num_classes, in_channels=in_channels, width=width, **kw)
    if weights is not None:
        load_weights(model, weights)
    return record_arch(model, name, num_classes, in_channels, width, **kw)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to an integer, at least 1."""
    return max(1, int(round(channels * width)))


# zoo modules register themselves on import (kept at the bottom: they import register_model)
from qcnn.models import bireal, lenet, resnet_cifar, ssdlite, vgg, wage_nets, yolo  # noqa: E402, F401
from qcnn.models.tv import build_torchvision  # noqa: E402

__all__ = ["ARCH_ATTR", "MODELS", "arch_record", "build_model", "keep_arch", "record_arch", "extract_state_dict",
           "list_models", "load_state_dict_checked", "load_weights", "model_accepts", "register_model", "scaled"]

"""Checkpoints: atomic writes, safe loads, and self-describing model files.

* :func:`save_atomic` writes to a temporary file in the destination directory, flushes and ``fsync``\\ s it,
  then ``os.replace``\\ s it over the destination: a reader never sees a half-written file, even if the
  writer is killed.
* :func:`load_checkpoint` first checks the CRC-32 of every member of the file (``torch.load`` does not: a
  flipped bit would load silently as another model), then reads with ``torch.load(weights_only=True)``:
  only tensors and plain containers (dict, list, tuple, str, numbers) are accepted. A pickled object of any
  other type, or a truncated / corrupted file, is refused with a ``ValueError``; nothing in it is executed.
* :func:`save_model` / :func:`load_model` handle the ``qcnn-model/1`` format::

      {"format": "qcnn-model/1",
       "arch": {"name": "resnet20", "num_classes": 10, "in_channels": 3, "width": 1.0, "kwargs": {...}}
               or None (a model outside the zoo: load_model(path, model=a fresh instance)),
       "model_class": "CifarResNet",
       "recipe": Recipe.to_dict() or None,
       "state_dict": {...},
       "metrics": {...} or None}

  :func:`load_model` rebuilds the architecture from ``arch``; if the file holds a recipe it applies
  ``qcnn.methods.quantize(model, Recipe.from_dict(recipe))`` first, so a quantized checkpoint is evaluated
  with exactly the quantized forward it was trained with. Plain float checkpoints (e.g. the shared CIFAR
  ResNet weights) load too when the architecture is given.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qcnn.io import load_torch, save_torch
from qcnn.methods.place import quantize
from qcnn.models import build_model
from qcnn.models.weights import extract_state_dict, load_state_dict_checked
from qcnn.recipes import Recipe

MODEL_FORMAT = "qcnn-model/1"


save_atomic = save_torch  #: ``torch.save`` atomically (:func:`qcnn.io.save_torch`)
load_checkpoint = load_torch  #: checked ``torch.load(weights_only=True)`` (:func:`qcnn.io.load_torch`)


def _arch_dict(arch: dict) -> dict:
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"arch must be a dict with at least 'name', got {arch!r}")
    out = {"name": arch["name"], "num_classes": int(arch.get("num_classes", 10)),
           "in_channels": int(arch.get("in_channels", 3)), "width": float(arch.get("width", 1.0)),
           "kwargs": dict(arch.get("kwargs") or {})}
    extra = sorted(set(arch) - set(out))
    if extra:
        raise ValueError(f"unknown arch key(s) {extra}; valid keys: {sorted(out)}")
    return out


def _class_name(model: nn.Module) -> str:
    """The user's class name (a torch.fx GraphModule keeps the traced class's name)."""
    return type(model).__name__


def save_model(path: str | Path, model: nn.Module, arch: dict | None = None, recipe=None,
               metrics: dict | None = None) -> Path:
    """Save ``model`` in the ``qcnn-model/1`` format (see module docstring), atomically.

    ``arch`` names a zoo architecture (rebuilt by :func:`load_model` alone); ``None`` for any other model
    (a torchvision / timm / hand-written network): the file then records the class name, and
    :func:`load_model` needs a fresh instance of that model (``model=``) to load onto."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if recipe is not None and not isinstance(recipe, dict):
        recipe = recipe.to_dict()
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_atomic({"format": MODEL_FORMAT, "arch": None if arch is None else _arch_dict(arch),
                        "model_class": _class_name(model), "recipe": recipe, "state_dict": sd,
                        "metrics": dict(metrics) if metrics else None}, path)


def build_from_arch(arch: dict, recipe: dict | None = None) -> nn.Module:
    """The (float, or quantized if ``recipe``) model described by ``arch``, with untrained weights."""

    arch = _arch_dict(arch)
    model = build_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                        width=arch["width"], **arch["kwargs"])
    if recipe is not None:

        model = quantize(model, Recipe.from_dict(recipe, where="checkpoint recipe"))
    return model


def _user_model(model, recipe: dict | None, source: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model= must be the float nn.Module to load {source} onto, got {type(model).__name__}")
    if recipe is None:
        return model
    return quantize(model, Recipe.from_dict(recipe, where=f"{source} recipe"))


def load_model(path: str | Path, device: str | torch.device = "cpu", arch: dict | None = None,
               model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored at ``path``; returns ``(model in eval mode on device, info)``.

    ``info`` holds ``format``, ``arch``, ``model_class``, ``recipe`` and ``metrics``. For a plain float
    checkpoint (anything :func:`qcnn.models.load_weights` accepts) pass ``arch``; it is also used to check a
    qcnn checkpoint's. ``model``: a fresh float instance of the user's own network (what was quantized before
    :func:`save_model`), which the stored recipe is applied to (``qcnn.methods.quantize``, on a copy) and the
    state loaded onto; needed when the file holds no zoo ``arch``.
    """

    obj = load_checkpoint(path)
    source = f"checkpoint {str(path)!r}"
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        stored = None if obj.get("arch") is None else _arch_dict(obj["arch"])
        if arch is not None and stored is not None and _arch_dict(arch)["name"] != stored["name"]:
            raise ValueError(f"{source} holds a {stored['name']!r} model, not {arch['name']!r}")
        arch, recipe, metrics, fmt = stored, obj.get("recipe"), obj.get("metrics"), MODEL_FORMAT
    elif isinstance(obj, dict) and isinstance(obj.get("format"), str):
        raise ValueError(f"{source} has format {obj['format']!r}; this version reads {MODEL_FORMAT!r}")
    else:
        if arch is None and model is None:
            raise ValueError(f"{source} is a plain state_dict without architecture; give the model (arch= or "
                             "model=)")
        arch, recipe, metrics, fmt = None if arch is None else _arch_dict(arch), None, None, "state_dict"
    cls = obj.get("model_class") if fmt == MODEL_FORMAT else None
    if model is not None:
        net = _user_model(model, recipe, source)
    elif arch is None:
        raise ValueError(f"{source} holds a {cls or 'user'} model, not a qcnn zoo architecture: pass a fresh "
                         f"instance of it, load_model(path, model={cls or 'MyNet'}(...))")
    else:
        net = build_from_arch(arch, recipe)
    load_state_dict_checked(net, extract_state_dict(obj, source), source)
    info = {"format": fmt, "arch": arch, "model_class": cls, "recipe": recipe, "metrics": metrics}
    return net.to(device).eval(), info


__all__ = ["MODEL_FORMAT", "build_from_arch", "load_checkpoint", "load_model", "save_atomic", "save_model"]

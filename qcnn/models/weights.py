"""Loading weights into a model with exact key checking.

:func:`load_weights` accepts a path or an already loaded object in any of these shapes:

* a raw ``state_dict`` (name -> tensor),
* ``{"state_dict": state_dict, ...}`` (the CIFAR ResNet checkpoints) or ``{"model": state_dict, ...}``
  (a ``qcnn`` training checkpoint ``last.pt``),
* a ``qcnn`` model checkpoint (``{"format": "qcnn-model/1", "state_dict": ...}``, see :mod:`qcnn.checkpoint`),

with a ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (``torch.compile``) prefix stripped. Files are read
with ``torch.load(weights_only=True)``. Keys must match the model exactly; a missing
``num_batches_tracked`` counter (older BatchNorm checkpoints) is the only tolerated difference. Otherwise
a ``ValueError`` names the missing, unexpected and shape-mismatched keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from qcnn.io import load_torch

_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 8


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict inside ``obj`` (see module docstring), with wrapper prefixes removed."""
    sd = obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("state_dict", "model"):
            if key in obj and _is_state_dict(obj[key]):
                sd = obj[key]
                break
        else:
            keys = sorted(map(str, obj))[:_MAX_LISTED]
            raise ValueError(f"{source} holds no state_dict (top-level keys: {keys})")
    if not _is_state_dict(sd):
        raise ValueError(f"{source} holds {type(obj).__name__}, not a state_dict of tensors")
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _listed(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def load_state_dict_checked(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(sd)`` with the key check described in the module docstring."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys [{_listed(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_listed(unexpected)}]")
    if missing or unexpected:
        if shapes:
            problems.append(f"shape mismatches [{_listed(shapes)}]")
        raise ValueError(f"{source} does not fit {type(model).__name__} (is it a checkpoint of another "
                         f"architecture?): " + "; ".join(problems))
    # keep the current values when shapes differ: torch copies the fitting tensors before it raises
    backup = {k: v.clone() for k, v in own.items()} if shapes else None
    try:
        # strict=False only because of num_batches_tracked; names were checked above. Quantizer buffers
        # that are resized on load (calibrated ranges) handle their own shapes.
        model.load_state_dict(dict(sd), strict=False)
    except RuntimeError as e:
        if backup is not None:
            model.load_state_dict(backup)
        detail = f"shape mismatches [{_listed(shapes)}]" if shapes else str(e)
        raise ValueError(f"{source} does not fit {type(model).__name__}: {detail}") from None


def load_weights(model: nn.Module, path_or_obj, source: str | None = None) -> nn.Module:
    """Load weights from a file (or loaded object) into ``model`` in place; returns ``model``."""
    if isinstance(path_or_obj, (str, Path)):

        source = source or f"checkpoint {str(path_or_obj)!r}"
        obj = load_torch(path_or_obj)
    else:
        source = source or "state_dict"
        obj = path_or_obj
    load_state_dict_checked(model, extract_state_dict(obj, source), source)
    return model

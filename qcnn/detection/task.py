"""Which task a model solves, read off the model: the loss and the metric come with the zoo model.

A model built by :func:`qcnn.models.build_model` carries its architecture record (kept by
:func:`qcnn.quantize`, checkpoints and ``torch.compile``'s wrapper); :func:`task_of` maps the detectors of the
zoo to their task object (loss, decoding, evaluation). Every other model is a classifier (cross-entropy,
top-1), which :func:`qcnn.train.fit` and :func:`qcnn.train.evaluate` handle themselves.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qcnn.detection.ssd import SSDTask
from qcnn.detection.yolo import YoloTask
from qcnn.models import arch_record

#: zoo detector name -> task factory of its architecture record
DETECTORS: dict[str, Callable[[dict], object]] = {
    "yolo_tiny": lambda arch: YoloTask(num_classes=int(arch["num_classes"])),
    "ssdlite": lambda arch: SSDTask(num_classes=int(arch["num_classes"])),
}


def _unwrap(model: nn.Module) -> nn.Module:
    for attr in ("_orig_mod", "module"):  # torch.compile's OptimizedModule, DistributedDataParallel
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def task_of(model: nn.Module | dict | None):
    """The detection task of ``model`` (or of an architecture record), None for a classifier."""
    if model is None:
        return None
    arch = model if isinstance(model, dict) else arch_record(_unwrap(model))
    if not arch:
        return None
    make = DETECTORS.get(arch.get("name"))
    return make(arch) if make is not None else None


def is_detector(model: nn.Module | dict | None) -> bool:
    return task_of(model) is not None


def metric_of(result: dict) -> str:
    """The headline metric of an evaluation result: ``top1`` for classifiers, the task's (``map_50``) else."""
    return result.get("metric", "top1")


__all__ = ["DETECTORS", "is_detector", "metric_of", "task_of"]

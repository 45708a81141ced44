"""What every detection task shares: evaluation by COCO mAP and decoded outputs over a loader.

A task (:class:`qcnn.detection.yolo.YoloTask`, :class:`qcnn.detection.ssd.SSDTask`) defines
``loss_from_output(p, targets)``, ``decode(p)`` (detections per image after NMS) and ``as_output`` (the raw
head output of a model or engine call in the task's own form: one tensor, or a tuple of tensors).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qcnn.detection.metrics import mean_average_precision


@dataclass(frozen=True, kw_only=True)
class DetectionTask:
    """Decoding settings and evaluation shared by the detection tasks (the base of the task dataclasses):
    detections scoring above ``score_threshold``, at most ``pre_nms`` of them before class-wise NMS at IoU
    ``nms_iou``, the ``max_detections`` best kept."""

    score_threshold: float = 0.01
    nms_iou: float = 0.5
    pre_nms: int = 300
    max_detections: int = 100
    name: str = "detection"
    metric: str = "map_50"

    def check_input(self, x) -> None:
        """Refuse an input the task cannot decode (here: any)."""

    def as_output(self, p):
        """The raw head output in the task's form (here one float32 tensor; engines may return numpy arrays or
        float64)."""
        return torch.as_tensor(p).float()

    @torch.no_grad()
    def evaluate(self, model, loader: Iterable, max_batches: int | None = None) -> dict:
        """COCO mAP (percent points) and the batch losses' mean (weighted by images) of ``model`` on
        ``loader``, in eval mode. ``model`` may be any callable from images to the raw head output (an
        integer engine, an ONNX Runtime session). Returns ``{"map_50", "map", "map_75", "loss", "images",
        "metric": "map_50"}``."""
        was = getattr(model, "training", None)
        if was is not None:
            model.eval()
        preds, gts, loss_sum, count = [], [], 0.0, 0
        try:
            for bi, (x, targets) in enumerate(loader):
                if max_batches is not None and bi >= max_batches:
                    break
                self.check_input(x)
                p = self.as_output(model(x))
                loss_sum += float(self.loss_from_output(p, targets)) * len(targets)
                count += len(targets)
                preds.extend(self.decode(p))
                gts.extend({"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets)
        finally:
            if was is not None:
                model.train(was)
        if count == 0:
            raise ValueError("evaluate: the loader is empty (0 images)")
        m = mean_average_precision(preds, gts)
        pct = {k: (100.0 * m[k] if m[k] >= 0 else m[k]) for k in ("map_50", "map", "map_75")}
        return {**pct, "loss": loss_sum / count if math.isfinite(loss_sum) else math.inf, "images": count,
                "metric": self.metric}

    def outputs(self, model: nn.Module, loader: Iterable) -> list[dict[str, Tensor]]:
        """Decoded detections of ``model`` over ``loader`` (eval mode), one dict per image."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return [d for x, _ in loader for d in self.decode(self.as_output(model(x)))]
        finally:
            model.train(was)


__all__ = ["DetectionTask"]

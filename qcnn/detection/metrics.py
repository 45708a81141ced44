"""Detection metrics: COCO mean average precision, computed by pycocotools' ``COCOeval``.

Definitions (COCO, bounding boxes): a prediction matches a ground-truth box of its class when their IoU is at
least the threshold ``t`` (predictions taken in decreasing score order, each ground truth matched at most
once, crowd boxes ignored); the precision/recall curve of a class at ``t`` is made monotone (precision at
recall ``r`` = the highest precision at any recall >= ``r``) and sampled at the 101 recalls ``0, 0.01, ...,
1`` (0 beyond the highest recall reached); AP is the mean of those samples. ``map_50`` / ``map_75`` are the
AP at ``t = 0.5`` / ``0.75`` averaged over the classes that have ground truth; ``map`` averages over the ten
thresholds ``0.50, 0.55, ..., 0.95`` too. At most 100 predictions per image count (the highest scores).
``map_small`` / ``medium`` / ``large`` restrict to boxes of area below 32², between, above 96² pixels;
``mar_1`` / ``mar_10`` / ``mar_100`` are the recalls with at most 1 / 10 / 100 predictions per image,
averaged over thresholds and classes. A value COCO cannot define (no ground truth at all, or none in an area
range) is ``-1``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch

#: keys of the result, in the order of ``COCOeval.stats``
METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
               "mar_small", "mar_medium", "mar_large")


def _field(d: dict, key: str, i: int, what: str, dtype: torch.dtype) -> torch.Tensor:
    if key not in d:
        raise ValueError(f"{what} {i} has no {key!r}")
    return torch.as_tensor(d[key]).detach().to("cpu", dtype)


def _xywh(boxes: torch.Tensor, i: int, what: str) -> np.ndarray:
    from torchvision.ops import box_convert

    if boxes.numel() == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} {i}: boxes must be [k, 4] (xyxy), not {list(boxes.shape)}")
    return box_convert(boxes, "xyxy", "xywh").double().numpy()


def mean_average_precision(preds: Sequence[dict], targets: Sequence[dict], per_class: bool = False) -> dict:
    """COCO box mAP of ``preds`` against ``targets`` (one dict per image, in the same order).

    ``preds[i]``: ``boxes`` ``[k, 4]`` xyxy pixels, ``scores`` ``[k]``, ``labels`` ``[k]`` (ints);
    ``targets[i]``: ``boxes`` ``[m, 4]`` xyxy, ``labels`` ``[m]`` and optionally ``iscrowd`` ``[m]`` (crowd
    boxes are ignored, not counted as misses). Returns floats under :data:`METRIC_KEYS` (see the module
    docstring); with ``per_class`` also ``classes`` (the labels seen, sorted) and ``map_per_class`` (AP over
    the ten thresholds for each, ``-1`` for a class without ground truth).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:  # a dependency of the package; absent only in a partial install
        raise ImportError("mean_average_precision needs pycocotools (pip install pycocotools)") from e

    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets: give one dict per image to each")
    images, gts, dts, labels_seen = [], [], [], set()
    for i, (p, t) in enumerate(zip(preds, targets)):
        images.append({"id": i})
        tb = _xywh(_field(t, "boxes", i, "target", torch.float64), i, "target")
        tl = _field(t, "labels", i, "target", torch.int64).reshape(-1).tolist()
        crowd = (_field(t, "iscrowd", i, "target", torch.int64).reshape(-1).tolist() if "iscrowd" in t
                 else [0] * len(tl))
        if not len(tb) == len(tl) == len(crowd):
            raise ValueError(f"target {i}: {len(tb)} boxes, {len(tl)} labels, {len(crowd)} iscrowd flags")
        for b, lab, c in zip(tb, tl, crowd):
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": lab, "bbox": b.tolist(),
                        "area": float(b[2] * b[3]), "iscrowd": int(c)})
        pb = _xywh(_field(p, "boxes", i, "prediction", torch.float64), i, "prediction")
        ps = _field(p, "scores", i, "prediction", torch.float64).reshape(-1).tolist()
        pl = _field(p, "labels", i, "prediction", torch.int64).reshape(-1).tolist()
        if not len(pb) == len(ps) == len(pl):
            raise ValueError(f"prediction {i}: {len(pb)} boxes, {len(ps)} scores, {len(pl)} labels")
        for b, s, lab in zip(pb, ps, pl):
            dts.append({"id": len(dts) + 1, "image_id": i, "category_id": lab, "bbox": b.tolist(),
                        "area": float(b[2] * b[3]), "score": s, "iscrowd": 0})
        labels_seen.update(tl)
        labels_seen.update(pl)
    classes = sorted(labels_seen)
    categories = [{"id": c, "name": str(c)} for c in classes]

    def _coco(anns: list[dict]) -> COCO:
        c = COCO()
        c.dataset = {"images": images, "annotations": anns, "categories": categories}
        c.createIndex()
        return c

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and the summary table
        ev = COCOeval(_coco(gts), _coco(dts), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict = {k: float(v) for k, v in zip(METRIC_KEYS, ev.stats)}
    if per_class:
        prec = ev.eval["precision"]  # [thresholds, recalls, classes, areas, max dets]; -1 where undefined
        aps = []
        for k in range(len(classes)):
            s = prec[:, :, k, 0, -1]
            aps.append(float(s[s > -1].mean()) if (s > -1).any() else -1.0)
        out["classes"], out["map_per_class"] = classes, aps
    return out


__all__ = ["METRIC_KEYS", "mean_average_precision"]

"""SSD detection with torchvision's own default boxes, matching, loss and decoding, for :mod:`qcnn.models.ssdlite`.

The network's raw output is the tuple ``(cls_0..cls_{L-1}, reg_0..reg_{L-1})`` of per-level maps
(``cls_l: [N, A (C + 1), H_l, W_l]``, ``reg_l: [N, 4 A, H_l, W_l]``, class 0 the background).
:meth:`SSDTask.head_outputs` lays them out as torchvision's ``SSDHead`` does (``[N, sum_l H_l W_l A, K]``, cell
by cell, then box by box) and everything else is torchvision's ``SSD`` code, called, not re-written:

* **default boxes** (:class:`~torchvision.models.detection.anchor_utils.DefaultBoxGenerator`, Liu et al. 2016):
  at level ``k`` of ``m``, scale ``s_k = s_min + (s_max - s_min) k / (m - 1)`` of the image side (``s_m = 1``),
  boxes ``s_k``, ``sqrt(s_k s_{k+1})`` square and ``s_k sqrt(a) x s_k / sqrt(a)`` for ``a`` in 2, 1/2, 3, 1/3,
  centred on every cell. ``s_min = 0.15``, ``s_max = 0.65`` here (torchvision's 320-pixel SSDlite: 0.2 and
  0.95): the composited objects are 14-40 pixels on 96-pixel canvases, 0.15-0.42 of the side.
* **matching** (``SSDMatcher``, IoU 0.5): every default box whose IoU with a ground-truth box is >= 0.5 takes
  its best one, and every ground-truth box takes its best default box whatever the IoU.
* **loss** (``SSD.compute_loss``): smooth-L1 on the box offsets of the matched boxes (encoded against the
  default box with weights 10, 10, 5, 5) plus cross-entropy on the positives and the hardest negatives (3 per
  positive), both divided by the number of positives.
* **decoding** (``SSD.postprocess_detections``): softmax scores, per class those above ``score_threshold``
  (at most ``pre_nms``), boxes decoded and clipped to the image, class-wise NMS at ``nms_iou``, the
  ``max_detections`` best kept.

The image side is taken as ``16`` times the first level's grid (the first level is at stride 16 in
MobileNetV3), so the training loss and evaluation refuse inputs whose sides are not multiples of 16 (the
96-pixel canvases are).
Labels are ``0..C-1`` outside this module (shifted by one for torchvision's background class).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from qcnn.detection.base import DetectionTask
from qcnn.models.ssdlite import ASPECT_RATIOS

FIRST_STRIDE = 16  #: input pixels per cell of the first level


@dataclass(frozen=True)
class SSDTask(DetectionTask):
    """Loss, decoding and evaluation of a :class:`qcnn.models.ssdlite.SSDLite` with ``num_classes`` classes."""

    num_classes: int = 10
    min_ratio: float = 0.15
    max_ratio: float = 0.65
    iou_threshold: float = 0.5

    @cached_property
    def ssd(self):
        """A torchvision ``SSD`` without backbone or head: its box coder, matcher, loss and post-processing."""
        from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
        from torchvision.models.detection.ssd import SSD

        boxes = DefaultBoxGenerator([list(r) for r in ASPECT_RATIOS], min_ratio=self.min_ratio,
                                    max_ratio=self.max_ratio)
        return SSD(nn.Identity(), boxes, (96, 96), self.num_classes + 1, head=nn.Identity(),
                   score_thresh=self.score_threshold, nms_thresh=self.nms_iou,
                   detections_per_img=self.max_detections, iou_thresh=self.iou_threshold,
                   topk_candidates=self.pre_nms)

    def check_input(self, x) -> None:
        h, w = x.shape[-2:]
        if h % FIRST_STRIDE or w % FIRST_STRIDE:
            raise ValueError(f"SSD input {h}x{w}: the sides must be multiples of {FIRST_STRIDE} (the default boxes "
                             f"are laid out on {FIRST_STRIDE} x the first level's grid); resize the images (the "
                             "COCO-format loader resizes to 96 x 96)")

    # -- layout ----------------------------------------------------------------------------------------
    def as_output(self, p) -> tuple[Tensor, ...]:
        if isinstance(p, Tensor) or not isinstance(p, (tuple, list)):
            raise ValueError(f"SSD output is {type(p).__name__}: expected the tuple of {2 * len(ASPECT_RATIOS)} "
                             "per-level head maps (class maps, then box maps)")
        return tuple(torch.as_tensor(t).float() for t in p)

    def check_output(self, p: tuple[Tensor, ...]) -> None:
        levels = len(ASPECT_RATIOS)
        if len(p) != 2 * levels:
            raise ValueError(f"SSD output has {len(p)} tensors: expected {2 * levels} (class and box maps of "
                             f"{levels} levels)")
        for i, (a, t) in enumerate(zip(self.ssd.anchor_generator.num_anchors_per_location() * 2, p)):
            k = self.num_classes + 1 if i < levels else 4
            if t.dim() != 4 or t.shape[1] != a * k:
                raise ValueError(f"SSD output {i} is {tuple(t.shape)}: expected [N, {a * k}, H, W] ({a} boxes x "
                                 f"{k})")

    def head_outputs(self, p: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """torchvision's head layout: ``{"cls_logits": [N, B, C + 1], "bbox_regression": [N, B, 4]}``."""
        self.check_output(p)
        levels = len(ASPECT_RATIOS)

        def flat(maps: tuple[Tensor, ...], k: int) -> Tensor:
            out = []
            for t in maps:
                n, _, h, w = t.shape
                out.append(t.float().view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k))
            return torch.cat(out, 1)

        return {"cls_logits": flat(p[:levels], self.num_classes + 1), "bbox_regression": flat(p[levels:], 4)}

    def anchors(self, p: tuple[Tensor, ...]) -> tuple[Tensor, tuple[int, int]]:
        """Default boxes ``[B, 4]`` (xyxy pixels) for the grids of ``p`` and the image size ``(H, W)``."""
        from torchvision.models.detection.image_list import ImageList

        h, w = p[0].shape[-2] * FIRST_STRIDE, p[0].shape[-1] * FIRST_STRIDE
        probe = ImageList(torch.empty(1, 1, h, w, device=p[0].device), [(h, w)])
        return self.ssd.anchor_generator(probe, [t[:1] for t in p[: len(ASPECT_RATIOS)]])[0], (h, w)

    # -- loss ------------------------------------------------------------------------------------------
    def loss_from_output(self, p, targets: list[dict]) -> Tensor:
        from torchvision.ops import box_iou

        p = self.as_output(p)
        out = self.head_outputs(p)
        anchors, _ = self.anchors(p)
        dev = anchors.device
        tv_targets, matched = [], []
        for t in targets:
            boxes = t["boxes"].to(dev, torch.float32).reshape(-1, 4)
            tv_targets.append({"boxes": boxes, "labels": t["labels"].to(dev, torch.int64).reshape(-1) + 1})
            if boxes.numel() == 0:
                matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=dev))
            else:
                matched.append(self.ssd.proposal_matcher(box_iou(boxes, anchors)))
        losses = self.ssd.compute_loss(tv_targets, out, [anchors] * len(targets), matched)
        return losses["bbox_regression"] + losses["classification"]

    def loss(self, net: nn.Module, x: Tensor, targets: list[dict]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The training loss of ``net`` on a batch, and its raw output (the ``fit`` ``loss_fn`` signature)."""
        self.check_input(x)
        p = net(x)
        return self.loss_from_output(p, targets), p

    # -- decoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, p) -> list[dict[str, Tensor]]:
        """Detections per image: ``{"boxes" [k, 4] xyxy pixels, "scores" [k], "labels" [k]}`` after NMS."""
        p = self.as_output(p)
        out = self.head_outputs(p)
        anchors, size = self.anchors(p)
        n = out["cls_logits"].shape[0]
        dets = self.ssd.postprocess_detections(out, [anchors] * n, [size] * n)
        return [{"boxes": d["boxes"].cpu(), "scores": d["scores"].cpu(), "labels": d["labels"].cpu() - 1}
                for d in dets]


__all__ = ["SSDTask"]

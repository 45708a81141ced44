"""YOLO-style single-stage detection: target assignment, loss, box decoding and NMS of :mod:`qcnn.models.yolo`.

The network's raw output ``p`` is ``[N, 5 + C, S_h, S_w]`` at stride ``s`` (8). Cell ``(i, j)`` predicts

    objectness ``o = sigmoid(p_0)``, centre ``c_x = (j + sigmoid(p_1)) s``, ``c_y = (i + sigmoid(p_2)) s``,
    size ``w = s exp(p_3)``, ``h = s exp(p_4)`` (``p_3, p_4`` clamped to ``[-4, 4]``), class ``softmax(p_5..)``.

**Assignment** (YOLOv2): a ground-truth box belongs to the cell that holds its centre; when two centres fall
into one cell the larger box keeps it. **Loss** per batch, every term summed and divided by the number of
assigned boxes ``P`` (at least 1):

    L = [ sum_cells BCE(p_0, 1[cell assigned]) + sum_assigned ( 2 (1 - GIoU(box, gt))
        + |sigmoid(p_1) - t_x| + |sigmoid(p_2) - t_y| + |p_3 - log(w_gt / s)| + |p_4 - log(h_gt / s)|
        + CE(p_5.., label) ) ] / P

with ``t_x = c_x,gt / s - j`` (the centre's offset in its cell). **Decoding** scores every (cell, class)
pair ``o softmax_c``, keeps those above ``score_threshold`` (at most ``pre_nms`` of them per image), runs
class-wise NMS at IoU ``nms_iou`` (``torchvision.ops.batched_nms``) and keeps the ``max_detections`` best.
The post-processing is float and outside the quantized / integer graph: the integer engine and ONNX export
run the network up to ``p``.

``evaluate`` (:class:`qcnn.detection.base.DetectionTask`) gives COCO mAP (pycocotools,
:mod:`qcnn.detection.metrics`) in percent points: ``{"map_50", "map", "map_75", "loss", "images", "metric":
"map_50"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qcnn.detection.base import DetectionTask
from qcnn.models.yolo import STRIDE

MAX_LOG_SIZE = 4.0


@dataclass(frozen=True)
class YoloTask(DetectionTask):
    """Loss, decoding and evaluation of a :class:`qcnn.models.yolo.TinyYOLO` with ``num_classes`` classes."""

    num_classes: int = 10
    stride: int = STRIDE

    # -- targets and loss ------------------------------------------------------------------------------
    def check_output(self, p: Tensor) -> None:
        if p.dim() != 4 or p.shape[1] != 5 + self.num_classes:
            raise ValueError(f"detector output {tuple(p.shape)}: expected [N, {5 + self.num_classes}, H, W] "
                             f"(5 + {self.num_classes} classes)")

    def assign(self, targets: list[dict], sh: int, sw: int, device) -> tuple[Tensor, ...]:
        """Flat cell index ``b S_h S_w + i S_w + j``, gt boxes [P, 4] and labels [P] of the assigned boxes (all
        images at once: sorted by cell, the larger box of a shared cell last, and the last of each cell kept)."""
        boxes = [t["boxes"].to(device, torch.float32).reshape(-1, 4) for t in targets]
        labels = [t["labels"].to(device, torch.int64).reshape(-1) for t in targets]
        if sum(len(b) for b in boxes) == 0:
            z = torch.zeros(0, dtype=torch.long, device=device)
            return z, torch.zeros(0, 4, device=device), z
        bx, lab = torch.cat(boxes), torch.cat(labels)
        counts = torch.tensor([len(b) for b in boxes], device=device)
        image = torch.repeat_interleave(torch.arange(len(boxes), device=device), counts)
        j = ((bx[:, 0] + bx[:, 2]) / 2 / self.stride).floor().long().clamp(0, sw - 1)
        i = ((bx[:, 1] + bx[:, 3]) / 2 / self.stride).floor().long().clamp(0, sh - 1)
        flat = image * sh * sw + i * sw + j
        order = torch.argsort((bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1]), stable=True)
        order = order[torch.argsort(flat[order], stable=True)]  # by cell; within a cell by area (ties: listed order)
        f = flat[order]
        last = torch.ones_like(f, dtype=torch.bool)
        last[:-1] = f[1:] != f[:-1]
        keep = order[last]
        return flat[keep], bx[keep], lab[keep]

    def decode_boxes(self, p: Tensor) -> Tensor:
        """Boxes ``[N, S_h S_w, 4]`` (xyxy pixels) of every cell."""
        n, _, sh, sw = p.shape
        ii, jj = torch.meshgrid(torch.arange(sh, device=p.device), torch.arange(sw, device=p.device), indexing="ij")
        cx = (jj + torch.sigmoid(p[:, 1])) * self.stride
        cy = (ii + torch.sigmoid(p[:, 2])) * self.stride
        w = self.stride * torch.exp(p[:, 3].clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE))
        h = self.stride * torch.exp(p[:, 4].clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE))
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        return boxes.reshape(n, sh * sw, 4)

    def loss_from_output(self, p: Tensor, targets: list[dict]) -> Tensor:
        from torchvision.ops import generalized_box_iou_loss

        self.check_output(p)
        p = p.float()
        n, _, sh, sw = p.shape
        cells, gt, labels = self.assign(targets, sh, sw, p.device)
        npos = max(1, int(cells.numel()))
        flat = p.permute(0, 2, 3, 1).reshape(n * sh * sw, -1)  # [cells, 5 + C]
        obj_t = torch.zeros(n * sh * sw, device=p.device)
        obj_t[cells] = 1.0
        loss = nn.functional.binary_cross_entropy_with_logits(flat[:, 0], obj_t, reduction="sum")
        if cells.numel():
            q = flat[cells]
            pred = self.decode_boxes(p).reshape(-1, 4)[cells]
            loss = loss + 2.0 * generalized_box_iou_loss(pred, gt, reduction="sum")
            j = (cells % sw).float()
            i = ((cells // sw) % sh).float()
            cx, cy = (gt[:, 0] + gt[:, 2]) / 2, (gt[:, 1] + gt[:, 3]) / 2
            tw = torch.log(((gt[:, 2] - gt[:, 0]) / self.stride).clamp_min(1e-3))
            th = torch.log(((gt[:, 3] - gt[:, 1]) / self.stride).clamp_min(1e-3))
            loss = loss + (torch.sigmoid(q[:, 1]) - (cx / self.stride - j)).abs().sum()
            loss = loss + (torch.sigmoid(q[:, 2]) - (cy / self.stride - i)).abs().sum()
            loss = loss + (q[:, 3] - tw).abs().sum() + (q[:, 4] - th).abs().sum()
            loss = loss + nn.functional.cross_entropy(q[:, 5:], labels, reduction="sum")
        return loss / npos

    def loss(self, net: nn.Module, x: Tensor, targets: list[dict]) -> tuple[Tensor, Tensor]:
        """The training loss of ``net`` on a batch, and its raw output (the ``fit`` ``loss_fn`` signature)."""
        p = net(x)
        return self.loss_from_output(p, targets), p

    # -- decoding --------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, p: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image: ``{"boxes" [k, 4] xyxy pixels, "scores" [k], "labels" [k]}`` after NMS."""
        from torchvision.ops import batched_nms

        self.check_output(p)
        p = p.float()
        n, c = p.shape[0], self.num_classes
        boxes = self.decode_boxes(p)
        flat = p.permute(0, 2, 3, 1).reshape(n, -1, 5 + c)
        scores = torch.sigmoid(flat[..., :1]) * torch.softmax(flat[..., 5:], -1)  # [N, cells, C]
        out = []
        for b in range(n):
            s = scores[b].reshape(-1)
            k = min(self.pre_nms, s.numel())
            top, idx = s.topk(k)
            keep = top > self.score_threshold
            top, idx = top[keep], idx[keep]
            cell, label = idx // c, idx % c
            bx = boxes[b, cell]
            sel = batched_nms(bx, top, label, self.nms_iou)[: self.max_detections]
            out.append({"boxes": bx[sel].cpu(), "scores": top[sel].cpu(), "labels": label[sel].cpu()})
        return out


__all__ = ["YoloTask"]

"""YOLO task: assignment, box decoding, NMS, loss values and gradients, mAP evaluation, task lookup, training.

Most tests build the raw head output ``p`` by hand with the inverse of the decoding formula of
:mod:`qcnn.detection.yolo` (``p_1 = logit(c_x / s - j)``, ``p_3 = log(w / s)``), so the expected boxes, scores
and losses are known exactly.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import qcnn
from qcnn.data.augment import Normalize
from qcnn.data.detection_loaders import DetectionLoader, detection_bundle
from qcnn.detection.task import is_detector, task_of
from qcnn.detection.yolo import YoloTask
from qcnn.models import arch_record, build_model
from qcnn.models.yolo import STRIDE, TinyYOLO

C = 10
TASK = YoloTask(num_classes=C)
BG, OBJ, CLS = -20.0, 20.0, 10.0  # background objectness, assigned objectness, the label's class logit


def _logit(t: float) -> float:
    return math.log(t / (1 - t))


def _encode(images: list[list[tuple]], sh: int, sw: int) -> torch.Tensor:
    """Raw output ``[N, 5 + C, sh, sw]`` encoding ``images[b] = [(box xyxy, label, objectness logit), ...]``; every
    other cell has objectness ``BG`` and zero offsets / log-sizes / class logits."""
    p = torch.zeros(len(images), 5 + C, sh, sw, dtype=torch.float64)
    p[:, 0] = BG
    for b, objs in enumerate(images):
        for (x0, y0, x1, y1), label, obj in objs:
            cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
            j, i = int(cx), int(cy)
            assert 0 < cx - j < 1 and 0 < cy - i < 1, "a centre on a cell border cannot be encoded"
            p[b, :5, i, j] = torch.tensor([obj, _logit(cx - j), _logit(cy - i), math.log((x1 - x0) / STRIDE),
                                           math.log((y1 - y0) / STRIDE)], dtype=torch.float64)
            p[b, 5:, i, j] = 0.0
            p[b, 5 + label, i, j] = CLS
    return p.float()


def _targets(images: list[list[tuple]]) -> list[dict]:
    return [{"boxes": torch.tensor([o[0] for o in objs], dtype=torch.float32).reshape(-1, 4),
             "labels": torch.tensor([o[1] for o in objs], dtype=torch.int64)} for objs in images]


def _score(obj: float) -> float:
    """sigmoid(p_0) * softmax of the label among logits (CLS, 0, ..., 0)."""
    return 1 / (1 + math.exp(-obj)) * math.exp(CLS) / (math.exp(CLS) + C - 1)


# --------------------------------------------------------------------------------------- assignment
def test_assign_cell_of_the_centre_and_larger_box_wins():
    sh, sw = 2, 4  # a 16 x 32 image: flat index b * 8 + i * 4 + j
    small, large = [18, 10, 22, 14], [15, 7, 27, 19]  # both centred at (20, 12) / (21, 13): cell (1, 2)
    other = [0, 0, 6, 14]  # centre (3, 7): cell (0, 0)
    targets = _targets([
        [(large, 1, 0), (other, 4, 0), (small, 2, 0)],  # the larger box listed first still wins
        [],
        [(small, 5, 0), (large, 6, 0)],  # and listed last
        [([28, 8, 32, 16], 7, 0)],  # centre (30, 12): cell (1, 3)
    ])
    cells, boxes, labels = TASK.assign(targets, sh, sw, "cpu")
    got = {int(c): (b.tolist(), int(lab)) for c, b, lab in zip(cells, boxes, labels)}
    assert got == {6: (large, 1), 0: (other, 4), 2 * 8 + 6: (large, 6), 3 * 8 + 7: ([28, 8, 32, 16], 7)}
    assert len(cells) == 4 and cells.dtype == torch.int64
    # the grid is H x W, not W x H: the same box on a 4 x 2 grid (a 32 x 16 image) sits elsewhere
    cells, _, _ = TASK.assign([{"boxes": torch.tensor([[4.0, 20, 8, 28]]), "labels": torch.tensor([0])}], 4, 2, "cpu")
    assert cells.tolist() == [3 * 2 + 0]  # centre (6, 24): i = 3, j = 0
    empty = TASK.assign(_targets([[], []]), sh, sw, "cpu")
    assert [t.shape for t in empty] == [(0,), (0, 4), (0,)]


# ----------------------------------------------------------------------------------- box decoding
A = ([8.0, 0.0, 32.0, 24.0], 3, 3.0)  # centre (20, 12): cell (1, 2)
B = ([39.0, 21.0, 49.0, 35.0], 7, 2.0)  # centre (44, 28): cell (3, 5)
A_DUP = ([3.5, 0.0, 27.5, 24.0], 3, 1.0)  # centre (15.5, 12): cell (1, 1), IoU with A 468 / 684 = 0.684
A_OTHER = ([12.5, 0.0, 36.5, 24.0], 5, 1.5)  # centre (24.5, 12): cell (1, 3), IoU 0.684 with A, another class


def test_decode_boxes_inverts_the_encoding():
    p = _encode([[A, B], [A_DUP]], 4, 6)
    p[1, 3, 0, 5], p[1, 4, 0, 5] = 9.0, -9.0  # log-sizes clamped to [-4, 4]
    boxes = TASK.decode_boxes(p)
    assert boxes.shape == (2, 24, 4)
    torch.testing.assert_close(boxes[0, 1 * 6 + 2], torch.tensor(A[0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(boxes[0, 3 * 6 + 5], torch.tensor(B[0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(boxes[1, 1 * 6 + 1], torch.tensor(A_DUP[0]), rtol=0, atol=1e-4)
    # zero offsets and log-sizes: an 8 x 8 box centred in its cell
    assert boxes[0, 0].tolist() == [0.0, 0.0, 8.0, 8.0]
    assert boxes[0, 2 * 6 + 4].tolist() == [32.0, 16.0, 40.0, 24.0]
    w, h = 8 * math.exp(4), 8 * math.exp(-4)
    torch.testing.assert_close(boxes[1, 5], torch.tensor([44 - w / 2, 4 - h / 2, 44 + w / 2, 4 + h / 2]))


def test_decode_scores_nms_threshold_and_max_detections():
    p = _encode([[A, B, A_DUP, A_OTHER], []], 4, 6)
    out = TASK.decode(p)
    assert len(out) == 2
    d = out[0]
    # A (highest score), B, then A_OTHER (kept: another class); A_DUP is suppressed by A
    torch.testing.assert_close(d["boxes"], torch.tensor([A[0], B[0], A_OTHER[0]]), rtol=0, atol=1e-4)
    assert d["labels"].tolist() == [3, 7, 5]
    torch.testing.assert_close(d["scores"], torch.tensor([_score(3.0), _score(2.0), _score(1.5)]), rtol=1e-6, atol=0)
    assert [len(v) for v in out[1].values()] == [0, 0, 0]  # an empty image: nothing above 0.01
    # NMS at an IoU above 0.684 keeps the duplicate too
    loose = dataclasses.replace(TASK, nms_iou=0.7).decode(p)[0]
    assert loose["labels"].tolist() == [3, 7, 5, 3]
    torch.testing.assert_close(loose["scores"][3], torch.tensor(_score(1.0)))
    # score threshold between B (0.880) and A_OTHER (0.817); max_detections; pre_nms
    assert dataclasses.replace(TASK, score_threshold=0.85).decode(p)[0]["labels"].tolist() == [3, 7]
    assert dataclasses.replace(TASK, max_detections=2).decode(p)[0]["labels"].tolist() == [3, 7]
    assert dataclasses.replace(TASK, pre_nms=1).decode(p)[0]["labels"].tolist() == [3]
    with pytest.raises(ValueError, match=r"expected \[N, 15, H, W\]"):
        TASK.decode(p[:, :14])


# ------------------------------------------------------------------------------------------- loss
def test_loss_of_perfect_and_perturbed_predictions():
    images = [[A, B], [A_OTHER]]
    for objs in images:
        for k, (box, label, _) in enumerate(objs):
            objs[k] = (box, label, OBJ)
    p, targets = _encode(images, 4, 6), _targets(images)
    perfect = float(TASK.loss_from_output(p, targets))
    # all that is left is the CE of logits (CLS, 0, ...): log(1 + (C - 1) e^-CLS) = 4.086e-4 per box, P = 3 boxes
    assert perfect == pytest.approx(math.log1p((C - 1) * math.exp(-CLS)), abs=2e-6)
    # widen A by e^0.5 (p_3 + 0.5): |p_3 - t_w| = 0.5 and GIoU = IoU = e^-0.5 (the gt lies inside), P = 3
    q = p.clone()
    q[0, 3, 1, 2] += 0.5
    expected = (0.5 + 2 * (1 - math.exp(-0.5))) / 3
    assert float(TASK.loss_from_output(q, targets)) == pytest.approx(perfect + expected, abs=2e-5)
    # the wrong class on B (logit CLS on class 1, 0 on its label 7): its CE goes from log(e^CLS + C - 1) - CLS to
    # log(e^CLS + C - 1) - 0, i.e. up by CLS
    r = p.clone()
    r[0, 5 + 7, 3, 5], r[0, 5 + 1, 3, 5] = 0.0, CLS
    assert float(TASK.loss_from_output(r, targets)) == pytest.approx(perfect + CLS / 3, abs=1e-5)


def test_loss_gradients_by_hand():
    images = [[A, B], [A_OTHER]]  # P = 3 assigned boxes
    p = _encode(images, 4, 6)
    p[0, 0, 2, 2] = 0.3  # an unassigned cell
    p[0, 0, 1, 2] = 1.0  # A's cell
    p[0, 5:, 3, 5] = torch.linspace(-1, 1, C)  # B's class logits
    p.requires_grad_(True)
    TASK.loss_from_output(p, _targets(images)).backward()
    g = p.grad
    sig = torch.sigmoid
    assert float(g[0, 0, 2, 2]) == pytest.approx(float(sig(torch.tensor(0.3))) / 3, rel=1e-5)
    assert float(g[0, 0, 1, 2]) == pytest.approx((float(sig(torch.tensor(1.0))) - 1) / 3, rel=1e-5)
    onehot = torch.zeros(C)
    onehot[B[1]] = 1
    torch.testing.assert_close(g[0, 5:, 3, 5], (torch.softmax(torch.linspace(-1, 1, C), 0) - onehot) / 3)
    # an unassigned cell gets gradient only on its objectness
    assert g[0, 1:, 2, 2].abs().max() == 0 and g[1, 1:, 0, 0].abs().max() == 0


def test_loss_without_boxes_is_the_objectness_term():
    p = torch.randn(2, 5 + C, 3, 3, generator=torch.Generator().manual_seed(0))
    loss = TASK.loss_from_output(p, _targets([[], []]))
    assert math.isfinite(float(loss))
    # P = 0 -> divided by 1: sum over cells of BCE(p_0, 0) = softplus(p_0)
    assert float(loss) == pytest.approx(float(torch.nn.functional.softplus(p[:, 0]).sum()), rel=1e-6)


# ------------------------------------------------------------------------------------- evaluation
def _hand_loader(images: list[list[tuple]], h: int, w: int, batch_size: int = 2) -> DetectionLoader:
    """Image ``k`` is filled with the value ``k`` (so a callable can tell which image it sees)."""
    x = torch.arange(len(images), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, h, w).contiguous()
    t = _targets(images)
    return DetectionLoader(x, [d["boxes"] for d in t], [d["labels"] for d in t], batch_size=batch_size,
                           normalize=Normalize((0.0,), (1.0,)))


def test_evaluate_perfect_and_empty_predictions():
    images = [[A, B], [A_OTHER], [([2.0, 3.0, 20.0, 30.0], 0, 5.0)]]
    p = _encode(images, 4, 6)
    loader = _hand_loader(images, 32, 48)

    def perfect(x):  # a plain callable, not an nn.Module
        return p[torch.round(x[:, 0, 0, 0] * 255).long()]

    r = TASK.evaluate(perfect, loader)
    assert r["map_50"] == pytest.approx(100.0) and r["map"] == pytest.approx(100.0)
    assert r["map_75"] == pytest.approx(100.0)
    assert r["images"] == 3 and r["metric"] == "map_50" and 0 < r["loss"] < 0.1
    # the loss is the images-weighted mean of the two batches' losses
    t = _targets(images)
    want = (2 * float(TASK.loss_from_output(p[:2], t[:2])) + float(TASK.loss_from_output(p[2:], t[2:]))) / 3
    assert r["loss"] == pytest.approx(want, rel=1e-6)

    def nothing(x):  # every score below the threshold; numpy output, as an ONNX session gives
        out = np.zeros((len(x), 5 + C, 4, 6), np.float32)
        out[:, 0] = BG
        return out

    r = TASK.evaluate(nothing, loader)
    assert r["map_50"] == 0.0 and r["map"] == 0.0 and r["images"] == 3
    assert TASK.evaluate(perfect, loader, max_batches=1)["images"] == 2


def test_evaluate_keeps_the_model_mode():
    torch.manual_seed(0)
    model = build_model("yolo_tiny", num_classes=C, in_channels=1, width=0.25)
    loader = _hand_loader([[A], [B], [A_OTHER]], 32, 48)
    r = qcnn.train.evaluate(model, loader)  # routed to the model's task
    assert model.training and r["images"] == 3 and r["metric"] == "map_50" and math.isfinite(r["loss"])
    model.eval()
    TASK.evaluate(model, loader)
    assert not model.training


# -------------------------------------------------------------------------------- model and task_of
def test_tiny_yolo_output():
    torch.manual_seed(0)
    model = build_model("yolo_tiny", num_classes=C, in_channels=1)
    assert isinstance(model, TinyYOLO) and model.head.out_channels == 15
    out = model.eval()(torch.zeros(2, 1, 40, 64))
    assert out.shape == (2, 15, 5, 8)
    bias = model.head.bias.detach()
    assert float(bias[0]) == -4.0 and bias[1:].abs().max() == 0


def test_task_of(tmp_path):
    model = build_model("yolo_tiny", num_classes=C, in_channels=1)
    task = task_of(model)
    assert isinstance(task, YoloTask) and task.num_classes == C and task.stride == 8 and is_detector(model)
    assert task_of(build_model("yolo_tiny", num_classes=3, in_channels=1)).num_classes == 3
    assert task_of(build_model("lenet5")) is None and not is_detector(build_model("lenet5"))
    assert task_of(None) is None and task_of(torch.nn.Conv2d(1, 15, 1)) is None
    assert task_of(arch_record(model)) == task
    recipe = qcnn.Recipe(method="uniform", w_bits=8, a_bits=8)
    qmodel = qcnn.quantize(model, recipe)
    assert task_of(qmodel) == task
    assert task_of(torch.compile(model)) == task and task_of(torch.compile(qmodel)) == task
    qcnn.save_model(tmp_path / "f.pt", model, arch=arch_record(model))
    loaded, info = qcnn.load_model(tmp_path / "f.pt")
    assert info["arch"]["name"] == "yolo_tiny" and task_of(loaded) == task
    qcnn.save_model(tmp_path / "q.pt", qmodel, arch=arch_record(model), recipe=recipe)
    loaded, info = qcnn.load_model(tmp_path / "q.pt")
    assert info["recipe"] is not None and task_of(loaded) == task


# ---------------------------------------------------------------------------------------- training
def test_short_training_learns_to_detect(fashion_dir, tmp_path):
    bundle = detection_bundle(data_dir=fashion_dir, cache_dir=tmp_path, download=False, n_train=600, n_test=200,
                              calib_size=0, batch_size=32)
    torch.manual_seed(0)
    model = build_model("yolo_tiny", num_classes=10, in_channels=1)
    before = qcnn.train.evaluate(model, bundle.test)
    assert before["map_50"] < 1.0  # measured 0.0
    spec = qcnn.TrainSpec(epochs=3, optimizer="adamw", lr=0.003, schedule="onecycle", weight_decay=5e-4,
                          batch_size=32)
    r = qcnn.train.fit(model, bundle, spec)
    losses = [h["train_loss"] for h in r["history"]]
    # measured: held-out mAP@0.5 32.2 points and mAP 13.2 (model seed 0, under pytest; 32.0 / 30.8 / 34.4 and
    # 13.3 / 12.2 / 13.5 for seeds 0 / 1 / 2 on one thread); training loss 9.06 -> 6.22 -> 4.95; test loss 11.85
    # before, 4.82 after
    assert r["metric"] == "map_50" and r["epochs"] == 3
    assert r["map_50"] > 20.0 and r["map"] > 5.0
    assert losses[0] > losses[1] > losses[2] and losses[2] < 0.75 * losses[0]
    assert r["loss"] < 0.6 * before["loss"]
    # the figures fit reports are those of the final model
    again = qcnn.train.evaluate(model, bundle.test)
    assert again["map_50"] == pytest.approx(r["map_50"]) and again["loss"] == pytest.approx(r["loss"], rel=1e-5)

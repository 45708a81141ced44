"""COCO mAP through pycocotools: perfect, shifted, empty and hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from qcnn.detection.metrics import METRIC_KEYS, mean_average_precision


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}


def _p(boxes, scores, labels):
    return {**_t(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


GT = [_t([[0, 0, 10, 10]], [0])]


def test_perfect_predictions():
    targets = [_t([[0, 0, 10, 10], [20, 20, 50, 40]], [0, 3]), _t([[5, 5, 90, 60]], [1]), _t([], [])]
    preds = [_p(t["boxes"].tolist(), [0.9] * len(t["labels"]), t["labels"].tolist()) for t in targets]
    r = mean_average_precision(preds, targets)
    assert set(METRIC_KEYS) <= set(r)
    assert r["map"] == pytest.approx(1.0) and r["map_50"] == pytest.approx(1.0) and r["mar_100"] == pytest.approx(1)


@pytest.mark.parametrize("dx, n_thresholds", [(3.0, 1), (2.4, 3), (0.0, 10)])
def test_shifted_box(dx, n_thresholds):
    # IoU of [0,0,10,10] with [dx,0,10+dx,10] is (10 - dx) / (10 + dx): 0.538 for dx=3, 0.613 for dx=2.4; the
    # single match is a perfect curve (AP 1) at the thresholds 0.5, 0.55, ... it reaches, AP 0 at the others
    r = mean_average_precision([_p([[dx, 0, 10 + dx, 10]], [0.8], [0])], GT, per_class=True)
    assert r["map_50"] == pytest.approx(1.0)
    assert r["map_75"] == pytest.approx(1.0 if dx == 0 else 0.0)
    assert r["map"] == pytest.approx(n_thresholds / 10)
    assert r["classes"] == [0] and r["map_per_class"] == [pytest.approx(n_thresholds / 10)]


def test_101_point_interpolation_by_hand():
    # two ground truths; a false positive (score 0.9) ranked above a true positive (0.8): precision 0.5 up to
    # recall 0.5, none beyond -> 51 of the 101 recall points at precision 0.5
    targets = [_t([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])]
    preds = [_p([[30, 30, 40, 40], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    r = mean_average_precision(preds, targets)
    assert r["map_50"] == pytest.approx(51 * 0.5 / 101)
    # the same with the scores swapped: precision 1 up to recall 0.5
    preds = [_p([[30, 30, 40, 40], [0, 0, 10, 10]], [0.8, 0.9], [0, 0])]
    assert mean_average_precision(preds, targets)["map_50"] == pytest.approx(51 / 101)


def test_empty_wrong_class_and_crowd():
    empty = [_p([], [], [])]
    r = mean_average_precision(empty, GT)
    assert r["map"] == 0.0 and r["map_50"] == 0.0 and r["mar_100"] == 0.0
    # a box of the wrong class matches nothing
    assert mean_average_precision([_p([[0, 0, 10, 10]], [0.9], [1])], GT)["map_50"] == 0.0
    # a prediction on a crowd region is ignored, not a false positive
    targets = [{**_t([[0, 0, 10, 10], [40, 40, 80, 80]], [0, 0]), "iscrowd": torch.tensor([0, 1])}]
    preds = [_p([[41, 41, 79, 79], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    assert mean_average_precision(preds, targets)["map"] == pytest.approx(1.0)
    # no ground truth at all: undefined, -1 as in COCO
    assert mean_average_precision(empty, [_t([], [])])["map"] == -1.0


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        mean_average_precision([_p([], [], [])] * 2, GT)
    with pytest.raises(ValueError, match="prediction 0: 1 boxes, 2 scores"):
        mean_average_precision([_p([[0, 0, 1, 1]], [0.1, 0.2], [0])], GT)
    with pytest.raises(ValueError, match="no 'scores'"):
        mean_average_precision([_t([[0, 0, 1, 1]], [0])], GT)


def test_on_the_composited_set(fashion_dir):
    from qcnn.data.detection import composited_detection

    ds = composited_detection("test", 16, seed=0, cache=False)
    targets = [ds[i][1] for i in range(len(ds))]
    preds = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    assert mean_average_precision(preds, targets)["map"] == pytest.approx(1.0)
    for p in preds:  # every box 2 px to the right
        p["boxes"] = p["boxes"] + torch.tensor([2.0, 0, 2, 0])
    r = mean_average_precision(preds, targets)
    assert r["map_50"] == pytest.approx(1.0) and 0.0 < r["map"] < 1.0

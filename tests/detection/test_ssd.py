"""SSDlite: the raw per-level head maps, laid out, matched, scored and decoded, equal torchvision's own ``SSD``
(built around the same backbone and head); task lookup; the quantized detector in the integer engine and its
ONNX form, code for code."""

from __future__ import annotations

import pytest
import torch

import qcnn
from qcnn.calib import calibrating
from qcnn.detection.ssd import SSDTask
from qcnn.detection.task import is_detector, task_of
from qcnn.integer import to_integer
from qcnn.integer.agreement import compare_codes, simulation_codes
from qcnn.integer.onnx_export import ort_codes, to_onnx
from qcnn.models import arch_record, build_model
from qcnn.models.ssdlite import SSDLite

C = 10
TASK = SSDTask(num_classes=C)


def _model(seed: int = 0, width: float = 1.0) -> SSDLite:
    torch.manual_seed(seed)
    return build_model("ssdlite", num_classes=C, in_channels=1, width=width)


def _targets() -> list[dict]:
    boxes = [[[10.0, 12.0, 40.0, 50.0], [50.0, 30.0, 90.0, 60.0]], [], [[20.0, 20.0, 36.0, 70.0]]]
    labels = [[3, 7], [], [0]]
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(lab).long()}
            for b, lab in zip(boxes, labels)]


def _torchvision_ssd(model: SSDLite):
    """torchvision's SSD around the same backbone and head; identity resize (96 -> 96) and normalisation."""
    from torchvision.models.detection.ssd import SSD

    return SSD(model.backbone, TASK.ssd.anchor_generator, (96, 96), C + 1, image_mean=[0.0], image_std=[1.0],
               head=model.head, score_thresh=TASK.score_threshold, nms_thresh=TASK.nms_iou,
               detections_per_img=TASK.max_detections, topk_candidates=TASK.pre_nms)


def test_output_maps_and_layout_are_torchvision_heads():
    model = _model().eval()
    x = torch.randn(2, 1, 96, 96)
    p = model(x)
    assert [tuple(t.shape) for t in p] == (
        [(2, 6 * (C + 1), s, s) for s in (6, 3, 2, 1, 1, 1)] + [(2, 24, s, s) for s in (6, 3, 2, 1, 1, 1)])
    ours = TASK.head_outputs(p)
    with torch.no_grad():
        ref = model.head(list(model.backbone(x).values()))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k
    anchors, size = TASK.anchors(p)
    assert size == (96, 96) and anchors.shape == (6 * (36 + 9 + 4 + 1 + 1 + 1), 4)
    # the first level's smallest default box: 0.15 of the side, centred on the first cell (8, 8)
    assert torch.allclose(anchors[0], torch.tensor([8 - 7.2, 8 - 7.2, 8 + 7.2, 8 + 7.2]))


def test_loss_and_detections_equal_torchvision_ssd():
    model = _model()
    x = torch.rand(3, 1, 96, 96)
    targets = _targets()
    tv = _torchvision_ssd(model)
    model.train()
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    torch.manual_seed(1)
    want = tv(list(x), tv_targets)
    ours, _ = TASK.loss(model, x, targets)
    want = float((want["bbox_regression"] + want["classification"]).detach())
    assert float(ours.detach()) == pytest.approx(want, rel=1e-5) and want > 1.0
    tv.eval()  # model's modules too
    with torch.no_grad():
        ref = tv(list(x))
        got = TASK.decode(model(x))
    assert len(got) == 3
    for g, r in zip(got, ref):
        assert len(g["scores"]) == len(r["scores"]) > 10
        assert torch.allclose(g["boxes"], r["boxes"], atol=1e-4) and torch.allclose(g["scores"], r["scores"])
        assert torch.equal(g["labels"], r["labels"] - 1) and int(g["labels"].min()) >= 0


def test_loss_gradient_reaches_matched_boxes_only_in_the_box_maps():
    model = _model().eval()
    x = torch.rand(3, 1, 96, 96)
    p = [t.detach().requires_grad_(True) for t in model(x)]
    TASK.loss_from_output(tuple(p), _targets()).backward()
    box_grad = TASK.head_outputs(tuple(t.grad for t in p))["bbox_regression"]  # [N, B, 4]
    moved = box_grad.abs().sum(-1) > 0
    assert moved[1].sum() == 0  # no boxes in image 1: no box gradient
    assert 2 <= int(moved[0].sum()) < 60 and 1 <= int(moved[2].sum()) < 30


def test_bad_outputs_are_named():
    model = _model().eval()
    p = model(torch.rand(1, 1, 96, 96))
    with pytest.raises(ValueError, match="expected 12"):
        TASK.loss_from_output(p[:6], _targets()[:1])
    with pytest.raises(ValueError, match=r"SSD output 0 is \(1, 66, 6, 6\): expected \[N, 30, H, W\] \(6 boxes x 5\)"):
        SSDTask(num_classes=4).decode(p)
    with pytest.raises(ValueError, match="SSD output is Tensor"):
        TASK.decode(p[0])
    with pytest.raises(ValueError, match="SSD input 100x96: the sides must be multiples of 16"):
        TASK.loss(model, torch.rand(1, 1, 100, 96), _targets()[:1])


def test_task_of_and_checkpoints(tmp_path):
    model = _model()
    task = task_of(model)
    assert isinstance(task, SSDTask) and task == TASK and is_detector(model)
    assert task_of(build_model("ssdlite", num_classes=3, in_channels=1)).num_classes == 3
    qmodel = qcnn.quantize(model, qcnn.Recipe(method="uniform", w_bits=8, a_bits=8, first_last="same"))
    assert task_of(qmodel) == task
    qcnn.save_model(tmp_path / "f.pt", model, arch=arch_record(model))
    loaded, info = qcnn.load_model(tmp_path / "f.pt")
    assert info["arch"]["name"] == "ssdlite" and task_of(loaded) == task
    x = torch.rand(2, 1, 96, 96)
    model.eval(), loaded.eval()
    assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x)))


@pytest.mark.parametrize("recipe", [{"method": "uniform", "w_bits": 8, "a_bits": 8},
                                    {"method": "fqn", "w_bits": 4, "a_bits": 4}], ids=["uniform8", "fqn4"])
def test_quantized_ssdlite_is_bit_exact_in_the_engine_and_onnx(recipe):
    """Every layer quantized (first conv, Hardswish / Hardsigmoid tables, squeeze-excitation products, residual
    adds, depthwise convs and all 12 head convs); the engine's codes equal the float64 simulation's, its 12
    head tensors equal the simulation's to float rounding, and the integer ONNX form in ONNX Runtime equals
    the engine."""
    model = _model(width=0.5).eval()
    q = qcnn.quantize(model, {**recipe, "first_last": "same"}).eval()
    torch.manual_seed(2)
    with torch.no_grad(), calibrating(q):
        q(torch.rand(16, 1, 96, 96))
    x = torch.rand(2, 1, 96, 96)
    ref64, sim64 = simulation_codes(q, x, dtype=torch.float64)
    im = to_integer(q, x)
    assert {"conv", "lut", "mul", "add"} <= {op.kind for op in im.ops}
    out, codes = im.run(x, record=True)
    assert set(codes) == set(sim64) and len(sim64) > 100
    cmp = compare_codes(codes, sim64)
    assert cmp["equal"] == 1.0 and cmp["max_diff"] == 0, cmp
    assert len(out) == len(ref64) == 12
    for o, r in zip(out, ref64):
        assert o.shape == r.shape and torch.allclose(o.double(), r, rtol=1e-5, atol=1e-5 * float(r.abs().max()))
    outs, got = ort_codes(*to_onnx(im, with_codes=True, form="integer"), x, threads=1)
    assert compare_codes(got, codes)["equal"] == 1.0
    assert torch.equal(outs, out[0])  # ort_codes returns the first network output
    dets_engine, dets_sim = TASK.decode(out), TASK.decode(tuple(r.float() for r in ref64))
    assert [len(d["scores"]) for d in dets_engine] == [len(d["scores"]) for d in dets_sim]


def test_engines_evaluate_the_same_detections(fashion_dir, tmp_path):
    """``run_engine`` (what ``qcnn eval --engine`` runs) on the 12 head maps: the integer engine and ONNX Runtime
    on its integer ONNX form give the same mAP and loss; the fake-quant model's are within float rounding."""
    from qcnn.data.detection_loaders import detection_bundle
    from qcnn.integer.evaluate import run_engine
    from qcnn.integer.onnx_runtime import OrtModel

    bundle = detection_bundle(data_dir=fashion_dir, cache_dir=tmp_path, download=False, n_train=64, n_test=48,
                              calib_size=64, batch_size=16, augment=False)
    q = qcnn.quantize(_model(width=0.5).eval(), {"method": "uniform", "w_bits": 8, "a_bits": 8,
                                                 "first_last": "same"}).eval()
    with torch.no_grad(), calibrating(q):
        for x, _ in bundle.calib:
            q(x)
    res = {k: run_engine(k, q, bundle.test) for k in ("fakequant", "integer", "onnxruntime-integer")}
    assert res["integer"]["images"] == res["onnxruntime-integer"]["images"] == 48
    for k in ("map_50", "map", "loss"):
        assert res["integer"][k] == res["onnxruntime-integer"][k], k
    assert res["integer"]["loss"] == pytest.approx(res["fakequant"]["loss"], rel=1e-4)
    x = next(iter(bundle.test))[0]
    outs = OrtModel(to_onnx(to_integer(q, x), form="integer"), threads=1)(x)
    assert isinstance(outs, list) and len(outs) == 12 and tuple(outs[6].shape) == (16, 24, 6, 6)

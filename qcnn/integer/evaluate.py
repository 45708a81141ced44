"""Top-1 (a detector: mAP) of a quantized model with one of the inference engines (``qcnn eval --engine``)."""

from __future__ import annotations

import torch
from torch import nn

from qcnn.detection.task import task_of
from qcnn.integer.compiler import to_integer
from qcnn.integer.onnx_export import to_onnx
from qcnn.integer.onnx_runtime import OrtModel
from qcnn.train import evaluate

ENGINES = ("float", "fakequant", "integer", "onnx", "onnxruntime", "onnxruntime-integer")


def _first_batch(loader):
    for x, _ in loader:
        return x
    raise ValueError("the evaluation set is empty: no batch was seen")


def _ort_engine(kind: str, im, threads: int | None) -> OrtModel:
    if kind == "onnxruntime-integer":
        return OrtModel(to_onnx(im, form="integer"), threads=threads)
    try:  # the channels-last QLinear form where the graph allows it, else the QDQ form
        onnx_model = to_onnx(im, form="qlinear")
    except ValueError:
        onnx_model = to_onnx(im, form="qdq")
    return OrtModel(onnx_model, threads=threads)


@torch.no_grad()
def run_engine(kind: str, model: nn.Module, loader, threads: int | None = None) -> dict:
    """Top-1 (percent) of ``model`` on ``loader`` with engine ``kind``: ``float`` / ``fakequant`` (PyTorch
    forward), ``integer`` (:func:`to_integer`), ``onnx`` / ``onnxruntime`` (the exported model in ONNX
    Runtime: QLinear form where the graph allows it, else QDQ), ``onnxruntime-integer`` (the integer ONNX form,
    bit-exact with ``integer``). Returns ``{"top1", "images", "engine"}`` (plus
    ``loss`` for the PyTorch engines); a detector's mAP figures (:mod:`qcnn.detection.yolo`) in place of top-1:
    the engine runs the network to its raw head tensor, box decoding and NMS stay float."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINES}")
    if kind in ("float", "fakequant"):
        return {**evaluate(model, loader), "engine": kind}
    model.eval()
    im = to_integer(model, _first_batch(loader))
    fn = im if kind == "integer" else _ort_engine(kind, im, threads)
    task = task_of(model)
    if task is not None:  # a detector: the engine computes the raw head tensor, decoding and NMS stay float
        def head(x):
            return task.as_output(fn(x if kind == "integer" else x.cpu()))

        return {**task.evaluate(head, loader), "engine": kind}
    correct = seen = 0
    for x, y in loader:
        logits = fn(x.cpu() if kind != "integer" else x)
        correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
        seen += y.numel()
    if seen == 0:
        raise ValueError("the evaluation set is empty: no batch was seen")
    return {"top1": 100.0 * correct / seen, "images": seen, "engine": kind}


__all__ = ["ENGINES", "run_engine"]

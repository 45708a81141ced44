"""Integer-only inference and export (Jacob et al., arXiv 1712.05877; FQN, CVPR 2019).

>>> im = to_integer(qmodel, example_batch)          # compile a calibrated / trained quantized model
>>> logits = im(x)                                  # integer-only forward (int64 tensors)
>>> im.save("resnet20_int")                         # resnet20_int.npz + resnet20_int.json
>>> to_onnx(im, "resnet20.onnx")                    # QDQ ONNX, ONNX Runtime fuses it to QLinearConv ...

See docs/integer.md.
"""

from __future__ import annotations

import torch
from torch import nn

from qcnn.integer.engine import ActGrid, IntegerModel, Op, int_conv2d, to_integer
from qcnn.integer.requant import multiply_by_quantized_multiplier, quantize_multiplier

ENGINES = ("float", "fakequant", "integer", "onnx", "onnxruntime")


def _first_batch(loader):
    for x, _ in loader:
        return x
    raise ValueError("the evaluation set is empty: no batch was seen")


@torch.no_grad()
def run_engine(kind: str, model: nn.Module, loader, threads: int | None = None) -> dict:
    """Top-1 (percent) of ``model`` on ``loader`` with engine ``kind``: ``float`` / ``fakequant`` (PyTorch
    forward), ``integer`` (:func:`to_integer`), ``onnx`` / ``onnxruntime`` (exported QDQ model in ONNX
    Runtime). Returns ``{"top1", "images", "engine"}`` (plus ``loss`` for the PyTorch engines)."""
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINES}")
    if kind in ("float", "fakequant"):
        from qcnn.train import evaluate

        return {**evaluate(model, loader), "engine": kind}
    model.eval()
    im = to_integer(model, _first_batch(loader))
    if kind == "integer":
        fn = im
    else:
        from qcnn.integer.onnx_export import OrtModel, to_onnx

        ort = OrtModel(to_onnx(im), threads=threads)
        fn = ort
    correct = seen = 0
    for x, y in loader:
        logits = fn(x.cpu() if kind != "integer" else x)
        correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
        seen += y.numel()
    if seen == 0:
        raise ValueError("the evaluation set is empty: no batch was seen")
    return {"top1": 100.0 * correct / seen, "images": seen, "engine": kind}


@torch.no_grad()
def add_residual_quantizers(model: nn.Module, bits: int = 8) -> nn.Module:
    """Give every QConv2d whose output feeds a residual ``QAdd`` directly an 8-bit output quantizer (signed,
    asymmetric, min/max calibrated; in place). Deployed int8 networks (torch.ao, TFLite) quantize those
    outputs so that the conv runs as QLinearConv and the add as QLinearAdd; the fake-quant simulation then
    models that rounding too. Needs BN folded (``fold_bn``/FQN) so that the conv output is the add input.
    Calibrate the model afterwards."""
    from torch import fx

    from qcnn.nn.layers import QAdd, QConv2d
    from qcnn.quant.uniform import UniformQuantizer

    if not isinstance(model, fx.GraphModule):
        raise ValueError("add_residual_quantizers needs the torch.fx GraphModule made by qcnn.quantize")
    mods = dict(model.named_modules())
    n = 0
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), QAdd):
            for a in node.args:
                if getattr(a, "op", None) == "call_module" and isinstance(mods.get(a.target), QConv2d) \
                        and len(a.users) == 1 and mods[a.target].out_quant is None:
                    conv = mods[a.target]
                    conv.out_quant = UniformQuantizer(bits, signed=True, symmetric=False, observer="minmax").to(
                        conv.weight.device)
                    n += 1
    if n == 0:
        raise ValueError("no conv output feeds a residual add directly (fold BatchNorm first)")
    return model


__all__ = ["ENGINES", "ActGrid", "IntegerModel", "Op", "add_residual_quantizers", "int_conv2d",
           "multiply_by_quantized_multiplier", "quantize_multiplier", "run_engine", "to_integer"]

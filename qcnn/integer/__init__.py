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

from qcnn.integer.bias import AccumulatorBias, add_bias_quantizers
from qcnn.integer.engine import ActGrid, IntegerModel, Op, int_conv2d, to_integer
from qcnn.integer.requant import multiply_by_quantized_multiplier, quantize_multiplier

ENGINES = ("float", "fakequant", "integer", "onnx", "onnxruntime", "onnxruntime-integer")


def _first_batch(loader):
    for x, _ in loader:
        return x
    raise ValueError("the evaluation set is empty: no batch was seen")


@torch.no_grad()
def run_engine(kind: str, model: nn.Module, loader, threads: int | None = None) -> dict:
    """Top-1 (percent) of ``model`` on ``loader`` with engine ``kind``: ``float`` / ``fakequant`` (PyTorch
    forward), ``integer`` (:func:`to_integer`), ``onnx`` / ``onnxruntime`` (the exported model in ONNX
    Runtime: QLinear form where the graph allows it, else QDQ), ``onnxruntime-integer`` (the integer ONNX form,
    bit-exact with ``integer``). Returns ``{"top1", "images", "engine"}`` (plus
    ``loss`` for the PyTorch engines)."""
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

        if kind == "onnxruntime-integer":
            onnx_model = to_onnx(im, form="integer")
        else:
            try:  # the channels-last QLinear form where the graph allows it, else the QDQ form
                onnx_model = to_onnx(im, form="qlinear")
            except ValueError:
                onnx_model = to_onnx(im, form="qdq")
        ort = OrtModel(onnx_model, threads=threads)
        fn = ort
    correct = seen = 0
    for x, y in loader:
        logits = fn(x.cpu() if kind != "integer" else x)
        correct += int((logits.argmax(1).cpu() == y.cpu()).sum())
        seen += y.numel()
    if seen == 0:
        raise ValueError("the evaluation set is empty: no batch was seen")
    return {"top1": 100.0 * correct / seen, "images": seen, "engine": kind}


_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity)


@torch.no_grad()
def add_residual_quantizers(model: nn.Module, bits: int = 8) -> nn.Module:
    """Give every QConv2d whose output reaches a residual ``QAdd`` unquantized (directly, or through ReLU /
    ReLU6 / identity shortcut modules) an 8-bit output quantizer (signed, asymmetric, min/max calibrated; in
    place). Deployed int8 networks (torch.ao, TFLite) quantize those outputs so that the conv runs as
    QLinearConv and the add as QLinearAdd; the fake-quant simulation then models that rounding too (the ReLU
    acts on the codes, ``max(q, z)``). Needs BN folded (``fold_bn``/FQN) so that the conv output is the add
    input. Calibrate the model afterwards."""
    from torch import fx

    from qcnn.nn.layers import QAdd, QConv2d
    from qcnn.quant.uniform import UniformQuantizer

    if not isinstance(model, fx.GraphModule):
        raise ValueError("add_residual_quantizers needs the torch.fx GraphModule made by qcnn.quantize")
    mods = dict(model.named_modules())

    def source_conv(a):
        while getattr(a, "op", None) in ("call_module", "call_function", "call_method"):
            m = mods.get(a.target) if a.op == "call_module" else None
            if isinstance(m, QConv2d):
                return a if len(a.users) == 1 else None
            passes = isinstance(m, _PASS_MODULES) or (a.op == "call_function" and a.target in (
                torch.relu, nn.functional.relu)) or (a.op == "call_method" and a.target == "relu")
            if not passes:
                return None
            a = a.args[0]
        return None

    n = 0
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), QAdd):
            for a in node.args:
                src = source_conv(a)
                if src is not None and mods[src.target].out_quant is None:
                    conv = mods[src.target]
                    conv.out_quant = UniformQuantizer(bits, signed=True, symmetric=False, observer="minmax").to(
                        conv.weight.device)
                    n += 1
    if n == 0:
        raise ValueError("no conv output feeds a residual add directly (fold BatchNorm first)")
    return model


@torch.no_grad()
def share_relu_grids(model: nn.Module) -> nn.Module:
    """Quantize each ReLU'd residual sum (and a ReLU'd conv output that also feeds a shortcut) once, on the grid
    of the convs that read it, as the fused ``add_relu`` / ``conv_relu`` of int8 runtimes do (in place; call it
    after calibration).

    For ``y = relu(src)`` where ``src`` is a ``QAdd`` or a ``QConv2d`` whose output quantizer was added by
    :func:`add_residual_quantizers`, and ``Q`` the (calibrated, per-tensor) input quantizer of the first
    ``QConv2d`` reading ``y``: ``src.out_quant`` and the input quantizer of every ``QConv2d`` reading ``y``
    become ``Q``. Since ``relu(Q(v)) = Q(relu(v))`` for a uniform grid that holds 0 or lies in ``[0, inf)``,
    and ``Q(Q(v)) = Q(v)``, the simulation computes ``Q(relu(src))`` once; the codes travel unchanged from the
    add to the next conv and to the next shortcut (no rescaling, ONNX Runtime runs QLinearAdd -> QLinearConv)
    and the post-ReLU grid spends all its codes on ``[0, max]``. Returns ``model``; raises ValueError if
    nothing was shared."""
    from torch import fx

    from qcnn.nn.layers import QAdd, QConv2d
    from qcnn.quant.base import Quantizer

    if not isinstance(model, fx.GraphModule):
        raise ValueError("share_relu_grids needs the torch.fx GraphModule made by qcnn.quantize")
    mods = dict(model.named_modules())

    def is_relu(n):
        return (n.op == "call_module" and type(mods.get(n.target)) is nn.ReLU) or (
            n.op == "call_function" and n.target in (torch.relu, nn.functional.relu)) or (
            n.op == "call_method" and n.target == "relu")

    n_shared = 0
    for node in model.graph.nodes:
        if not is_relu(node) or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        smod = mods.get(src.target) if src.op == "call_module" else None
        if not isinstance(smod, (QAdd, QConv2d)) or len(src.users) != 1 or smod.out_quant is None:
            continue
        convs = [mods[u.target] for u in node.users
                 if u.op == "call_module" and isinstance(mods.get(u.target), QConv2d)]
        quants = [c.input_quant for c in convs
                  if isinstance(c.input_quant, Quantizer) and c.input_quant.is_initialized()]
        if not quants or quants[0].grid().scale is None or quants[0].grid().scale.numel() != 1:
            continue
        q = quants[0]
        smod.out_quant = q
        for c in convs:
            c.input_quant = q
        n_shared += 1
    if n_shared == 0:
        raise ValueError("no ReLU'd residual sum or conv output read by a quantized conv: nothing to share")
    return model


__all__ = ["ENGINES", "AccumulatorBias", "ActGrid", "IntegerModel", "Op", "add_bias_quantizers",
           "add_residual_quantizers", "int_conv2d", "multiply_by_quantized_multiplier", "quantize_multiplier",
           "run_engine", "share_relu_grids", "to_integer"]

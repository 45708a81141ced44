"""Graph passes that prepare a quantized model for int8 deployment (before / after calibration).

* :func:`add_residual_quantizers`: 8-bit codes on the conv outputs that feed residual adds (so both operands of
  every add are codes and the add runs as QLinearAdd);
* :func:`share_relu_grids`: each ReLU'd residual sum quantized once, on the grid of the convs that read it.

:func:`qcnn.integer.add_bias_quantizers` (:mod:`qcnn.integer.bias`) is the third pass of the deployment model.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from qcnn.nn.layers import QAdd, QConv2d
from qcnn.quant.base import Quantizer
from qcnn.quant.uniform import UniformQuantizer

_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.Identity, nn.MaxPool2d)


@torch.no_grad()
def add_residual_quantizers(model: nn.Module, bits: int = 8) -> nn.Module:
    """Give every QConv2d whose output reaches a residual ``QAdd`` unquantized (directly, or through ReLU / ReLU6
    / max pool / identity shortcut modules, as the stem of torchvision's ResNets) an 8-bit output quantizer
    (signed, asymmetric, min/max calibrated; in place). Deployed int8 networks (torch.ao, TFLite) quantize those
    outputs so that the conv runs as QLinearConv and the add as QLinearAdd; the fake-quant simulation then models
    that rounding too (the ReLU acts on the codes, ``max(q, z)``). Needs BN folded (``fold_bn``/FQN) so that the
    conv output is the add input. Calibrate the model afterwards."""
    if not isinstance(model, fx.GraphModule):
        raise ValueError("add_residual_quantizers needs the torch.fx GraphModule made by qcnn.quantize")
    mods = dict(model.named_modules())

    def source_conv(a):
        while getattr(a, "op", None) in ("call_module", "call_function", "call_method"):
            m = mods.get(a.target) if a.op == "call_module" else None
            if isinstance(m, QConv2d):
                return a if len(a.users) == 1 else None
            passes = isinstance(m, _PASS_MODULES) or (a.op == "call_function" and a.target in (
                torch.relu, nn.functional.relu, nn.functional.max_pool2d)) or (
                a.op == "call_method" and a.target == "relu")
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


__all__ = ["add_residual_quantizers", "share_relu_grids"]

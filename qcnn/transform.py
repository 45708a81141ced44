"""Graph rewrites shared by every method: reading and changing a model's ``torch.fx`` graph.

* :func:`is_relu` / :func:`input_is_signed`: whether the tensor a layer consumes may be negative
  (unsigned after ReLU/ReLU6/Hardtanh(min >= 0), through pooling and reshapes). The one ReLU recogniser.
* :func:`set_module`: replace a submodule by qualified name.
* :func:`fold_bn`: fold every eval-mode BatchNorm that follows a conv into it,
  ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
* :func:`layers_in_order`, :func:`swap_layer`, :func:`quantize_adds`: the steps
  :func:`qcnn.methods.quantize` takes to put a method's quantizers on a network (tensor-tensor adds
  become ``QAdd`` modules, so integer-only inference can follow the graph).
* :func:`attach_bn` / :func:`fold_conv_bn`: FQN's conv + BN pairs (``QConvBn2d``) and their fold.
* :func:`to_variational`: VNQ's variational layers.

Nothing here knows about methods or recipes; the policy (which quantizer goes where) is
:mod:`qcnn.methods`.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcnn.nn.layers import QUANT_LAYERS, ChannelClamp, QAdd, QConv2d, QConvBn2d, QLinear
from qcnn.nn.vnq import VNQConv2d, VNQLinear
from qcnn.quant.vnq import VNQQuantizer

_PASS_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_PASS_FUNCS = {torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.dropout}
_PASS_METHODS = {"view", "reshape", "flatten", "mean", "contiguous"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
_WEIGHTED_UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                         nn.Bilinear, nn.Embedding)


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that conv (fx based)."""
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    model = fuse(model.eval())
    return model.train(was_training)


_INF = float("inf")
#: ReLU-like functions: their (lo, hi) clip from the node's arguments
_CLIP_FUNCS = {
    F.relu: lambda n: (0.0, _INF), torch.relu: lambda n: (0.0, _INF), torch.relu_: lambda n: (0.0, _INF),
    F.relu6: lambda n: (0.0, 6.0),
    F.hardtanh: lambda n: (float(n.kwargs.get("min_val", n.args[1] if len(n.args) > 1 else -1.0)),
                           float(n.kwargs.get("max_val", n.args[2] if len(n.args) > 2 else 1.0))),
}


def clip_bounds(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[float, float | torch.Tensor] | None:
    """``(lo, hi)`` of a clipping activation node (ReLU: ``(0, inf)``, ReLU6: ``(0, 6)``, Hardtanh: its bounds,
    :class:`ChannelClamp`: ``(0, upper)`` per channel); None for any other node."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, ChannelClamp):
            return 0.0, m.upper
        if isinstance(m, nn.Hardtanh):  # ReLU6 too
            return float(m.min_val), float(m.max_val)
        return (0.0, _INF) if isinstance(m, nn.ReLU) else None
    if node.op == "call_function" and node.target in _CLIP_FUNCS:
        return _CLIP_FUNCS[node.target](node)
    return (0.0, _INF) if node.op == "call_method" and node.target in ("relu", "relu_") else None


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A clipping activation whose output is never negative (ReLU, ReLU6, Hardtanh(lo >= 0), ChannelClamp)."""
    bounds = clip_bounds(node, modules)
    return bounds is not None and bounds[0] >= 0


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized ``model`` with every quantizer slot emptied (input, weight, output and bias
    quantizers of the layers, residual-add outputs) and no trainable parameter: the float function of its
    current weights, with the same graph and module names."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        for slot in ("input_quant", "weight_quant", "out_quant", "bias_quant"):
            if isinstance(getattr(m, slot, None), nn.Module):
                setattr(m, slot, None)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCS
    return node.op == "call_method" and node.target in _PASS_METHODS


def input_is_signed(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the tensor consumed by ``node`` may be negative (no ReLU before it in the graph)."""
    src = node.args[0] if node.args else None
    while isinstance(src, fx.Node):
        if is_relu(src, modules):
            return False
        if _is_passthrough(src, modules) and src.args:
            src = src.args[0]
            continue
        return True
    return True


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def check_supported(model: nn.Module, supported: tuple[type[nn.Module], ...], method: str, skipped: set[str]) -> None:
    """Raise ValueError naming the first weight-bearing layer (outside ``skipped``) that ``method`` cannot
    quantize: a layer type outside ``supported``, or one no method quantizes (Conv1d/3d, transposed convs)."""
    for name, m in model.named_modules():
        if name in skipped:
            continue
        if isinstance(m, _WEIGHTED_UNSUPPORTED) or (
            isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, supported)
        ):
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}) cannot be quantized by method {method!r} "
                f"(it supports {[t.__name__ for t in supported]}); leave it in float with an "
                f"override {{pattern: {name!r}, skip: true}}"
            )


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``torch.fx.symbolic_trace(model)``, or None (with a warning) for models fx cannot trace."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many error types on untraceable code
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({e}); falling back to module swap, "
            "residual adds stay in float",
            stacklevel=3,
        )
        return None


def layers_in_order(root: nn.Module, gm: fx.GraphModule | None) -> list[tuple[str, bool]]:
    """(name, input may be negative) of every Conv2d / Linear in graph order (module order without a graph)."""
    kinds = tuple(QUANT_LAYERS)
    if gm is None:
        return [(n, True) for n, m in root.named_modules() if isinstance(m, kinds)]
    modules = dict(gm.named_modules())
    return [(node.target, input_is_signed(node, modules)) for node in gm.graph.nodes
            if node.op == "call_module" and isinstance(modules[node.target], kinds)]


def swap_layer(root: nn.Module, name: str, aq, wq, gq) -> None:
    """Replace the float Conv2d / Linear ``name`` with its quantized layer holding the given quantizers."""
    float_mod = root.get_submodule(name)
    qcls = QUANT_LAYERS[type(float_mod)] if type(float_mod) in QUANT_LAYERS else (
        QConv2d if isinstance(float_mod, nn.Conv2d) else QLinear)
    set_module(root, name, qcls.from_float(float_mod, aq, wq, gq))


def quantize_adds(gm: fx.GraphModule, make_quantizer) -> int:
    """Replace every tensor-tensor add by a ``QAdd`` whose output quantizer is ``make_quantizer()``;
    returns how many (call ``gm.recompile()`` afterwards)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ADD_FUNCS or len(node.args) != 2:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node.kwargs:
            continue
        name = f"qadd_{n}"
        n += 1
        gm.add_submodule(name, QAdd(make_quantizer()))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (a, b))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    return n


def attach_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every ``QConv2d -> BatchNorm2d`` pair (the BN the conv's only user) by one :class:`QConvBn2d`
    (in place); the BN node leaves the graph and lives inside the new module."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and type(modules.get(src.target)) is QConv2d):
            continue
        set_module(gm, src.target, QConvBn2d.from_qconv(modules[src.target], modules[node.target]))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """Turn every :class:`QConvBn2d` of ``model`` into a folded plain QConv2d (in place); returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QConvBn2d):
            set_module(model, name, m.to_qconv())
    if isinstance(model, fx.GraphModule):
        model.recompile()
    return model


def variational_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every quantized layer whose weight quantizer is a :class:`VNQQuantizer`."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear)) and isinstance(m.weight_quant, VNQQuantizer)]


def to_variational(model: nn.Module) -> nn.Module:
    """Swap (in place) every VNQ-quantized ``QConv2d``/``QLinear`` for its noisy training version.

    Parameters and state_dict keys are shared, so a checkpoint of either version loads into the other.
    """
    for name, m in variational_layers(model):
        if isinstance(m, (VNQConv2d, VNQLinear)):
            continue
        cls = VNQConv2d if isinstance(m, QConv2d) else VNQLinear
        new = cls.from_float(m, m.input_quant, m.weight_quant, m.out_quant)
        set_module(model, name, new)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every QConv2d / QLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]

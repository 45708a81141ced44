"""``quantize(model, recipe)``: put a method's quantizers on a float model.

Steps (the float model is never modified; a quantized copy is returned):

1. The method's ``prepare`` hook may change the architecture (e.g. BN without affine for HWGQ).
2. With ``recipe.fold_bn`` (PTQ), BatchNorm layers are folded into the preceding conv (eval statistics):
   ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
3. The model is traced with ``torch.fx``. Each ``Conv2d``/``Linear`` becomes a ``QConv2d``/``QLinear``
   holding the method's weight quantizer, a quantizer on the activation it consumes and optionally a
   gradient quantizer on its output; whether the consumed activation is signed is read off the graph
   (unsigned after ReLU/ReLU6, through pooling and reshapes). Tensor-tensor adds (residuals) become
   ``QAdd`` modules with an output quantizer at ``max(a_bits, 8)`` bits (residual sums keep 8 bits, as in
   deployed integer networks), so that integer-only inference can follow the graph.
4. The first and last quantizable layers (in graph order) follow ``recipe.first_last``: ``fp32`` leaves
   them float, ``8bit`` gives them 8-bit weights and activations, ``same`` the recipe's bits.
5. Per-layer overrides (``fnmatch`` patterns on module names) set bits or skip layers.

Models that ``torch.fx`` cannot trace fall back to a plain module swap (adds stay float) with a warning.
Any weight-bearing layer type the method cannot quantize is named in a ``ValueError``.
"""

from __future__ import annotations

import copy
import fnmatch
import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcnn.nn.layers import QUANT_LAYERS, QAdd, QConv2d, QLinear
from qcnn.quant.registry import LayerContext, Method, get_method
from qcnn.recipes import Recipe

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = {F.relu, torch.relu, F.relu6, torch.relu_, F.hardtanh}
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


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _RELU_MODULES):
            return True
        return isinstance(m, nn.Hardtanh) and m.min_val >= 0
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        if node.target is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            return lo >= 0
        return True
    return node.op == "call_method" and node.target in ("relu", "relu_")


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
        if _is_relu(src, modules):
            return False
        if _is_passthrough(src, modules) and src.args:
            src = src.args[0]
            continue
        return True
    return True


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _check_supported(model: nn.Module, method: Method, skipped: set[str]) -> None:
    for name, m in model.named_modules():
        if name in skipped:
            continue
        if isinstance(m, _WEIGHTED_UNSUPPORTED) or (
            isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, method.supported)
        ):
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}) cannot be quantized by method {method.name!r} "
                f"(it supports {[t.__name__ for t in method.supported]}); leave it in float with an "
                f"override {{pattern: {name!r}, skip: true}}"
            )


def _layer_bits(name: str, role: str, recipe: Recipe) -> tuple[int, int] | None:
    """(w_bits, a_bits) for a layer, or None to keep it float."""
    w, a = recipe.w_bits, recipe.a_bits
    if role != "hidden":
        if recipe.first_last == "fp32":
            return None
        if recipe.first_last == "8bit":
            w, a = 8, (8 if a is not None else None)
    for o in recipe.overrides:
        if fnmatch.fnmatchcase(name, o.pattern):
            if o.skip:
                return None
            w = o.w_bits if o.w_bits is not None else w
            a = o.a_bits if o.a_bits is not None else a
    return w, a


def quantize(model: nn.Module, recipe: Recipe | dict, inplace: bool = False) -> nn.Module:
    """Return a quantized copy of ``model`` following ``recipe`` (see module docstring)."""
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    method = get_method(recipe.method, recipe.params)
    if not inplace:
        model = copy.deepcopy(model)
    model = method.prepare(model)
    if recipe.fold_bn:
        model = fold_bn(model)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many error types on untraceable code
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({e}); falling back to module swap, "
            "residual adds stay in float",
            stacklevel=2,
        )
        gm = None
    root = gm if gm is not None else model
    modules = dict(root.named_modules())

    # quantizable layers in graph order, with whether their input can be negative
    layers: list[tuple[str, bool]] = []
    if gm is not None:
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(modules[node.target], tuple(QUANT_LAYERS)):
                layers.append((node.target, input_is_signed(node, modules)))
    else:
        layers = [(n, True) for n, m in model.named_modules() if isinstance(m, tuple(QUANT_LAYERS))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")

    skipped = {n for n, _ in layers if _layer_bits(n, "hidden", recipe) is None}
    _check_supported(root, method, skipped)

    for i, (name, signed) in enumerate(layers):
        role = "first" if i == 0 else ("last" if i == len(layers) - 1 else "hidden")
        bits = _layer_bits(name, role, recipe)
        if bits is None:
            continue
        float_mod = modules[name]
        ctx = LayerContext(
            name=name,
            module=float_mod,
            role=role,
            w_bits=bits[0],
            a_bits=bits[1],
            input_signed=signed or role == "first",
            per_channel=recipe.per_channel,
            calib=recipe.calib,
            g_bits=recipe.g_bits,
            e_bits=recipe.e_bits,
            options=method.options,
        )
        if bits[1] is None:  # float activations (a_bits: null)
            aq = None
        else:
            aq = method.input_quantizer(ctx) if role == "first" else method.act_quantizer(ctx)
        qcls = QUANT_LAYERS[type(float_mod)] if type(float_mod) in QUANT_LAYERS else (
            QConv2d if isinstance(float_mod, nn.Conv2d) else QLinear)
        q = qcls.from_float(float_mod, aq, method.weight_quantizer(ctx), method.grad_quantizer(ctx))
        _set_module(root, name, q)

    if gm is not None and recipe.quantize_adds and recipe.a_bits is not None:
        _quantize_adds(gm, method, recipe)
        gm.recompile()
    return root


def _quantize_adds(gm: fx.GraphModule, method: Method, recipe: Recipe) -> None:
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _ADD_FUNCS or len(node.args) != 2:
            continue
        a, b = node.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or node.kwargs:
            continue
        name = f"qadd_{n}"
        n += 1
        gm.add_submodule(name, QAdd(method.add_quantizer(max(recipe.a_bits, 8), recipe.calib)))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (a, b))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every QConv2d / QLinear in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))]

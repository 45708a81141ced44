"""``quantize(model, recipe)``: put a method's quantizers on a float model.

Steps (the float model is never modified; a quantized copy is returned):

1. The recipe's bit widths are checked against what the method defines (:meth:`Method.defines`): a
   weight-only method given ``a_bits``, or bits the method has no grid for, is refused by name.
2. The method's ``prepare`` hook may change the architecture (e.g. BN without affine for HWGQ).
3. With ``recipe.fold_bn`` (PTQ), BatchNorm layers are folded into the preceding conv (eval statistics); a model
   ``torch.fx`` cannot trace keeps its BatchNorm, with a warning.
4. The model is traced with ``torch.fx`` (:class:`qcnn.transform.LayerTracer`: every weight layer, subclasses
   included, stays one module). Each ``Conv1d``/``Conv2d``/``ConvTranspose2d``/``Linear``, or subclass of one
   (timm's ``Linear``), becomes a ``QConv1d``/``QConv2d``/``QConvTranspose2d``/``QLinear`` with the same weight and
   bias, computing its base type's standard ``F.conv*``/``F.linear`` (what a subclass's own ``forward`` adds is
   not kept: a warning names the subclasses that override ``forward``), holding the method's weight quantizer, a
   quantizer on the activation it consumes and optionally a
   gradient quantizer on its output; whether the consumed activation is signed is read off the graph
   (:func:`qcnn.transform.input_is_signed`). Tensor-tensor adds (residuals) become ``QAdd`` modules with
   an output quantizer at ``max(a_bits, 8)`` bits (residual sums keep 8 bits, as in deployed integer
   networks), so that integer-only inference can follow the graph.
5. The first and last quantizable layers (in graph order) follow ``recipe.first_last``: ``fp32`` leaves
   them float, ``8bit`` gives them 8-bit weights and activations, ``same`` the recipe's bits.
6. Per-layer overrides (``fnmatch`` patterns on module names) set bits or skip layers; a pattern that matches
   no weight layer is refused with the closest layer names.
7. ``recipe.ptq``: with ``equalize``, cross-layer equalization (:mod:`qcnn.methods.equalize`) rescales the
   BN-folded layers before any calibration; with bias correction or high-bias absorption every layer gets a
   bias (:func:`qcnn.methods.bias_correction.ensure_biases`). Both are structural, so a checkpoint is rebuilt
   with the same modules; the data-dependent steps are :func:`qcnn.methods.ptq.post_training_quantize`'s.

Models that ``torch.fx`` cannot trace fall back to a plain module swap (adds stay float) with a warning.
Every weight layer ends up quantized, left float on request (first/last policy, skip override) or named in a
``ValueError``: a layer type the method cannot quantize (outside ``Method.supported``), one no quantized layer
exists for (Conv3d, ConvTranspose1d/3d, Bilinear, Embedding, MultiheadAttention, RNNs), or one the forward does not
call as a module (its weight read directly).
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import warnings

from torch import fx, nn

from qcnn.methods.base import LayerContext, Method, get_method
from qcnn.methods.bias_correction import ensure_biases
from qcnn.methods.equalize import cross_layer_equalize
from qcnn.models import arch_record, keep_arch
from qcnn.nn.layers import QUANT_LAYERS, QUANTIZED_LAYERS
from qcnn.recipes import Recipe
from qcnn.transform import (
    check_supported,
    float_weight_layers,
    fold_bn,
    layers_in_order,
    quantize_adds,
    split_norm_act,
    swap_layer,
    trace,
    weight_view,
)


def layer_bits(name: str, role: str, recipe: Recipe) -> tuple[int, int | None] | None:
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


def check_defined(method: Method, recipe: Recipe) -> None:
    """Refuse a recipe whose bit widths the method does not define (e.g. ``a_bits`` for a weight-only one)."""
    reason = type(method).defines(recipe.w_bits, recipe.a_bits)
    if reason is not None:
        hint = " (set a_bits: null)" if recipe.a_bits is not None and not method.quantizes_activations else ""
        raise ValueError(f"recipe W{recipe.w_bits}/A{recipe.a_bits if recipe.a_bits is not None else 'fp'} "
                         f"is not defined: {reason}{hint}")


def check_overrides(recipe: Recipe, names: list[str], model_name: str) -> None:
    """Refuse an override pattern that matches none of the weight layers ``names``, with the closest names."""
    for o in recipe.overrides:
        if any(fnmatch.fnmatchcase(n, o.pattern) for n in names):
            continue
        close = difflib.get_close_matches(o.pattern, names, n=5, cutoff=0.5)
        hint = f"closest layer names: {close}" if close else f"no close name (the first: {names[:5]})"
        raise ValueError(f"override pattern {o.pattern!r} matches no weight layer of {model_name}; {hint}; "
                         f"{len(names)} layer names are valid (fnmatch patterns on qualified module names, "
                         "qcnn.transform.float_weight_layers(model) lists them)")


def _check_all_reached(gm: fx.GraphModule | None, model: nn.Module, reached: set[str]) -> None:
    """Refuse a weight layer the traced forward does not call as a module but reads the weight of (e.g.
    ``F.linear(x, self.fc.weight)``): no quantizer could reach it. ``reached``: the layers called as modules and
    those left float on request."""
    if gm is None:
        return
    layers = dict(float_weight_layers(model))
    for node in gm.graph.nodes:
        owner, _, attr = str(node.target).rpartition(".") if node.op == "get_attr" else ("", "", "")
        if owner in layers and owner not in reached:
            raise ValueError(f"layer {owner!r} ({type(layers[owner]).__name__}) is not called as a module: the "
                             f"forward reads its {attr!r} directly, so no quantizer can be put on it; leave it in "
                             f"float with an override {{pattern: {owner!r}, skip: true}}")


def _warn_subclass_forwards(root: nn.Module, names: list[str]) -> None:
    """One warning naming the subclassed layers whose own ``forward`` the quantized layers replaced."""
    own = set()
    for name in names:
        m = root.get_submodule(name)
        base = next(t for t in QUANT_LAYERS if isinstance(m, t))
        if type(m) is not base and type(m).forward is not base.forward and not isinstance(m, QUANTIZED_LAYERS):
            own.add(f"{type(m).__module__}.{type(m).__qualname__} ({base.__name__})")
    if own:
        warnings.warn(f"quantize(): {', '.join(sorted(own))} override forward; their quantized layers compute the "
                      "standard F.conv1d / F.conv2d / F.conv_transpose2d / F.linear of the base type with the "
                      "layer's weight and bias (what else the subclass's forward does is not kept)", stacklevel=3)


def _context(method: Method, recipe: Recipe, name: str, module: nn.Module, role: str, bits, signed: bool):
    return LayerContext(name=name, module=weight_view(module), role=role, w_bits=bits[0], a_bits=bits[1],
                        input_signed=signed or role == "first", per_channel=recipe.per_channel,
                        calib=recipe.calib, g_bits=recipe.g_bits, e_bits=recipe.e_bits, options=method.options)


def quantize(model: nn.Module, recipe: Recipe | dict, inplace: bool = False) -> nn.Module:
    """Return a quantized copy of ``model`` following ``recipe`` (see module docstring)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize() needs an nn.Module, got {type(model).__name__} {model!r:.80}")
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if not isinstance(recipe, Recipe):
        raise TypeError(f"quantize() needs a Recipe or a dict, got {type(recipe).__name__} {recipe!r:.80} (a recipe "
                        "file: qcnn.recipes.load_recipe(name_or_path))")
    method = get_method(recipe.method, recipe.params)
    check_defined(method, recipe)
    if not inplace:
        model = copy.deepcopy(model)
    record = arch_record(model)  # before BN folding, which traces the model into a GraphModule
    model = split_norm_act(method.prepare(model))
    if recipe.fold_bn:
        model = fold_bn(model)
    gm = trace(model)
    root = gm if gm is not None else model
    layers = layers_in_order(root, gm)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer (nor Conv1d, ConvTranspose2d) to "
                         "quantize")
    names = list(dict.fromkeys([n for n, _ in layers] + [n for n, _ in float_weight_layers(model)]))
    check_overrides(recipe, names, type(model).__name__)
    skipped = {n for n in names if layer_bits(n, "hidden", recipe) is None}
    check_supported(root, method.supported, method.name, skipped)
    _check_all_reached(gm, model, skipped | {n for n, _ in layers})
    _warn_subclass_forwards(root, [n for n, _ in layers])

    for i, (name, signed) in enumerate(layers):
        role = "first" if i == 0 else ("last" if i == len(layers) - 1 else "hidden")
        bits = layer_bits(name, role, recipe)
        if bits is None:
            continue
        ctx = _context(method, recipe, name, root.get_submodule(name), role, bits, signed)
        if bits[1] is None:  # float activations (a_bits: null)
            aq = None
        else:
            aq = method.input_quantizer(ctx) if role == "first" else method.act_quantizer(ctx)
        swap_layer(root, name, aq, method.weight_quantizer(ctx), method.grad_quantizer(ctx))

    if gm is not None and recipe.quantize_adds and recipe.a_bits is not None:
        quantize_adds(gm, lambda: method.add_quantizer(max(recipe.a_bits, 8), recipe.calib))
        gm.recompile()
    _post_training_structure(root, gm, recipe)
    return keep_arch(root, arch_record(model) or record)  # the traced copy keeps the architecture record


def _post_training_structure(root: nn.Module, gm, recipe: Recipe) -> None:
    """What ``recipe.ptq`` changes in the layers before calibration, so that a checkpoint rebuilds the same
    modules: cross-layer equalization (data-free; it may turn a ReLU6 between a pair into a ReLU) and a
    bias on every layer when a later step writes biases."""
    spec = recipe.ptq
    if spec.equalize:
        if not recipe.fold_bn or gm is None:
            raise ValueError("ptq: equalize needs fold_bn=True and an fx-traceable model (cross-layer "
                             "equalization works on the BN-folded graph); qcnn ptq folds BN")
        cross_layer_equalize(gm, relu6=spec.equalize_relu6)
    if spec.bias_correction or (spec.equalize and spec.absorb_bias):
        ensure_biases(root)


__all__ = ["check_defined", "check_overrides", "layer_bits", "quantize"]

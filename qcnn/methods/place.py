"""``quantize(model, recipe)``: put a method's quantizers on a float model.

Steps (the float model is never modified; a quantized copy is returned):

1. The recipe's bit widths are checked against what the method defines (:meth:`Method.defines`): a
   weight-only method given ``a_bits``, or bits the method has no grid for, is refused by name.
2. The method's ``prepare`` hook may change the architecture (e.g. BN without affine for HWGQ).
3. With ``recipe.fold_bn`` (PTQ), BatchNorm layers are folded into the preceding conv (eval statistics).
4. The model is traced with ``torch.fx``. Each ``Conv2d``/``Linear`` becomes a ``QConv2d``/``QLinear``
   holding the method's weight quantizer, a quantizer on the activation it consumes and optionally a
   gradient quantizer on its output; whether the consumed activation is signed is read off the graph
   (:func:`qcnn.transform.input_is_signed`). Tensor-tensor adds (residuals) become ``QAdd`` modules with
   an output quantizer at ``max(a_bits, 8)`` bits (residual sums keep 8 bits, as in deployed integer
   networks), so that integer-only inference can follow the graph.
5. The first and last quantizable layers (in graph order) follow ``recipe.first_last``: ``fp32`` leaves
   them float, ``8bit`` gives them 8-bit weights and activations, ``same`` the recipe's bits.
6. Per-layer overrides (``fnmatch`` patterns on module names) set bits or skip layers.
7. ``recipe.ptq``: with ``equalize``, cross-layer equalization (:mod:`qcnn.methods.equalize`) rescales the
   BN-folded layers before any calibration; with bias correction or high-bias absorption every layer gets a
   bias (:func:`qcnn.methods.bias_correction.ensure_biases`). Both are structural, so a checkpoint is rebuilt
   with the same modules; the data-dependent steps are :func:`qcnn.methods.ptq.post_training_quantize`'s.

Models that ``torch.fx`` cannot trace fall back to a plain module swap (adds stay float) with a warning.
Any weight-bearing layer type the method cannot quantize is named in a ``ValueError``.
"""

from __future__ import annotations

import copy
import fnmatch

from torch import nn

from qcnn.methods.base import LayerContext, Method, get_method
from qcnn.methods.bias_correction import ensure_biases
from qcnn.methods.equalize import cross_layer_equalize
from qcnn.models import arch_record, keep_arch
from qcnn.recipes import Recipe
from qcnn.transform import check_supported, fold_bn, layers_in_order, quantize_adds, swap_layer, trace


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


def _context(method: Method, recipe: Recipe, name: str, module: nn.Module, role: str, bits, signed: bool):
    return LayerContext(name=name, module=module, role=role, w_bits=bits[0], a_bits=bits[1],
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
    model = method.prepare(model)
    if recipe.fold_bn:
        model = fold_bn(model)
    gm = trace(model)
    root = gm if gm is not None else model
    layers = layers_in_order(root, gm)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    skipped = {n for n, _ in layers if layer_bits(n, "hidden", recipe) is None}
    check_supported(root, method.supported, method.name, skipped)

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
    return keep_arch(root, arch_record(model))  # the traced copy keeps the model's architecture record


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


__all__ = ["check_defined", "layer_bits", "quantize"]

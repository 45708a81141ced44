"""Graph rewrites shared by every method: reading and changing a model's ``torch.fx`` graph.

* :func:`is_relu` / :func:`input_is_signed`: whether the tensor a layer consumes may be negative
  (unsigned after ReLU/ReLU6/Hardtanh(min >= 0), through pooling and reshapes). The one ReLU recogniser.
* :func:`set_module`: replace a submodule by qualified name.
* :func:`trace`: ``torch.fx`` tracing with :class:`LayerTracer`, which keeps every weight layer, subclasses
  included (timm's ``Linear``), one ``call_module`` node.
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

from qcnn.nn.layers import (
    QUANT_LAYERS,
    QUANTIZED_LAYERS,
    ChannelClamp,
    QAct,
    QAdd,
    QCat,
    QConv2d,
    QConvBn2d,
    QLinear,
    QMul,
    transposed_to_conv_layout,
)
from qcnn.nn.vnq import VNQConv2d, VNQLinear
from qcnn.quant.vnq import VNQQuantizer

_PASS_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_PASS_FUNCS = {torch.flatten, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.dropout}
_PASS_METHODS = {"view", "reshape", "flatten", "mean", "contiguous"}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add}
#: float layer types :func:`swap_layer` quantizes (their subclasses too): Conv1d, Conv2d, ConvTranspose2d, Linear
QUANTIZABLE = tuple(QUANT_LAYERS)
#: weight-bearing layers no quantized layer exists for (refused by name unless skipped; a MultiheadAttention or RNN
#: computes its projections inside one module, out of reach of layer quantizers)
_WEIGHTED_UNSUPPORTED = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose3d, nn.Bilinear, nn.Embedding, nn.EmbeddingBag,
                         nn.MultiheadAttention, nn.RNNBase)
_WEIGHT_LAYERS = QUANTIZABLE + _WEIGHTED_UNSUPPORTED


def is_float_weight_layer(m: nn.Module) -> bool:
    """A float weight-bearing layer (conv, transposed conv, linear, embedding, attention, RNN; subclasses included)
    that is not one of qcnn's quantized layers."""
    return isinstance(m, _WEIGHT_LAYERS) and not isinstance(m, QUANTIZED_LAYERS)


class LayerTracer(fx.Tracer):
    """The ``torch.fx`` tracer of :func:`trace`: every float weight layer is a leaf (one ``call_module`` node),
    subclasses of ``nn.Conv2d`` / ``nn.Linear`` / ... defined outside ``torch.nn`` included (fx's own rule
    traces through those, so that a timm ``Linear`` would vanish into an ``F.linear`` call). qcnn's quantized
    layers are traced as by ``fx.symbolic_trace``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_float_weight_layer(m) or super().is_leaf_module(m, module_qualified_name)


def _trace_or_warn(model: nn.Module, consequence: str, stacklevel: int) -> fx.GraphModule | None:
    try:
        tracer = LayerTracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001 - fx raises many error types on untraceable code
        warnings.warn(f"torch.fx could not trace {type(model).__name__} ({e}); {consequence}", stacklevel=stacklevel)
        return None


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def split_norm_act(model: nn.Module) -> nn.Module:
    """Replace (in place) every BatchNorm subclass that also applies an activation, such as timm's
    ``BatchNormAct2d`` (``act(drop(batch_norm(x)))``, children ``drop`` and ``act``), by
    ``nn.Sequential(bn=<plain BatchNorm with its parameters and statistics>, drop=..., act=...)``: the same
    function. fx traces such a subclass into ``F.batch_norm`` on the module's attributes with the mode fixed
    at trace time, so without this its statistics could neither follow train mode in QAT, be re-estimated,
    nor be folded; split, the BatchNorm is an ordinary module. Returns ``model`` (the root itself is left)."""
    for name, m in list(model.named_modules()):
        if not name or type(m) in _PLAIN_BN or not isinstance(m, _PLAIN_BN):
            continue
        children = dict(m.named_children())
        if "act" not in children:
            continue
        base = next(t for t in _PLAIN_BN if isinstance(m, t))
        bn = base(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                  track_running_stats=m.track_running_stats)
        ref = next(iter([*m.parameters(recurse=False), *m.buffers(recurse=False)]), None)
        if ref is not None:
            bn.to(ref.device)
        bn.load_state_dict({k: v for k, v in m.state_dict().items() if "." not in k})
        seq = nn.Sequential()
        seq.add_module("bn", bn)
        for child, mod in children.items():
            seq.add_module(child, mod)
        set_module(model, name, seq.train(m.training))
    return model


def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eval-mode BatchNorm that directly follows a conv / linear layer folded into
    it (``Conv1d/2d/3d -> BatchNorm1d/2d/3d``, ``Linear -> BatchNorm1d``, the BN the layer's only user; layers of
    exactly those types: a subclass may compute something else). Uses the graph of :class:`LayerTracer`, so
    subclassed layers stay modules. A model ``torch.fx`` cannot trace is returned as it is, BatchNorm unfolded,
    with a warning (the graph is what tells which BN follows which conv)."""
    from torch.fx.experimental.optimization import fuse

    was_training = model.training
    gm = _trace_or_warn(copy.deepcopy(model).eval(), "BatchNorm stays unfolded (fold_bn needs the graph to find "
                        "each conv -> BatchNorm pair)", stacklevel=3)
    if gm is None:
        return model
    fused = fuse(gm, inplace=True, no_trace=True)
    fused = fx.GraphModule(fused, fused.graph, type(model).__name__)  # keep the user's class name
    return fused.train(was_training)


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


def node_is_one_of(node: fx.Node, modules: dict[str, nn.Module], module_types: tuple, funcs, methods) -> bool:
    """Whether ``node`` calls a module of ``module_types``, a function in ``funcs`` or a method in ``methods``."""
    if node.op == "call_module":
        return isinstance(modules[node.target], module_types)
    if node.op == "call_function":
        return node.target in funcs
    return node.op == "call_method" and node.target in methods


def _is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node_is_one_of(node, modules, _PASS_MODULES, _PASS_FUNCS, _PASS_METHODS)


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


def float_weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every float weight layer of ``model`` (:func:`is_float_weight_layer`), module order."""
    return [(n, m) for n, m in model.named_modules() if is_float_weight_layer(m)]


def check_supported(model: nn.Module, supported: tuple[type[nn.Module], ...], method: str, skipped: set[str]) -> None:
    """Raise ValueError naming the first float weight layer (outside ``skipped``) that ``method`` cannot
    quantize: a layer type outside ``supported``, or one no quantized layer exists for (Conv3d, ConvTranspose1d/3d,
    Bilinear, Embedding(Bag), MultiheadAttention, RNN / LSTM / GRU)."""
    for name, m in float_weight_layers(model):
        if name in skipped:
            continue
        if isinstance(m, _WEIGHTED_UNSUPPORTED) or not isinstance(m, supported):
            raise ValueError(
                f"layer {name!r} ({type(m).__name__}) cannot be quantized by method {method!r} "
                f"(it supports {[t.__name__ for t in supported]}); leave it in float with an "
                f"override {{pattern: {name!r}, skip: true}}"
            )


def trace(model: nn.Module) -> fx.GraphModule | None:
    """``model`` traced by ``torch.fx`` with :class:`LayerTracer` (``fx.symbolic_trace`` keeping every weight
    layer, subclasses included, a module), or None (with a warning) for models fx cannot trace."""
    return _trace_or_warn(model, "falling back to module swap, residual adds stay in float", stacklevel=4)


def layers_in_order(root: nn.Module, gm: fx.GraphModule | None) -> list[tuple[str, bool]]:
    """(name, input may be negative) of every Conv1d / Conv2d / ConvTranspose2d / Linear (subclasses included: the
    quantized layers too) in graph order, once each (a layer called twice: its first call's place, signed if any
    input is); module order, inputs taken as signed, without a graph."""
    if gm is None:
        return [(n, True) for n, m in root.named_modules() if isinstance(m, QUANTIZABLE)]
    modules = dict(gm.named_modules())
    order: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], QUANTIZABLE):
            order[node.target] = order.get(node.target, False) or input_is_signed(node, modules)
    return list(order.items())


def weight_view(module: nn.Module) -> nn.Module:
    """The layer as its weight quantizer sees it: ``module`` itself, except a ConvTranspose2d, given as a
    stand-in ``nn.Conv2d`` (detached copies, no gradient) whose weight is the transposed conv's in conv layout
    ``(out, in/groups, kH, kW)`` (what :class:`~qcnn.nn.layers.QConvTranspose2d` hands its weight quantizer),
    so that a quantizer sized from the weight (one step per output channel) fits."""
    if not isinstance(module, nn.ConvTranspose2d):
        return module
    w = transposed_to_conv_layout(module.weight.detach(), module.groups)
    view = nn.Conv2d(module.out_channels, module.in_channels, module.kernel_size, groups=module.groups,
                     bias=module.bias is not None, device="meta")
    view.weight = nn.Parameter(w.clone(), requires_grad=False)
    if module.bias is not None:
        view.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return view


def swap_layer(root: nn.Module, name: str, aq, wq, gq) -> None:
    """Replace the float Conv1d / Conv2d / ConvTranspose2d / Linear ``name`` (or a subclass of one: its weight and
    bias are kept, the quantized layer computes the standard ``F.conv*`` / ``F.linear`` of its type) with its
    quantized layer holding the given quantizers."""
    float_mod = root.get_submodule(name)
    qcls = next((q for f, q in QUANT_LAYERS.items() if isinstance(float_mod, f)), None)
    if qcls is None:
        raise TypeError(f"layer {name!r} ({type(float_mod).__name__}) is not a float "
                        f"{'/'.join(t.__name__ for t in QUANTIZABLE)} layer")
    set_module(root, name, qcls.from_float(float_mod, aq, wq, gq))


#: ``torch.cat`` and its aliases (QCat), tensor-tensor products (QMul)
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_MUL_FUNCS = {operator.mul, operator.imul, torch.mul}
#: elementwise activations that integer inference runs as lookup tables (QAct): modules, functions, methods
_LUT_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU)


def _leaky_relu_module(node: fx.Node) -> nn.Module | None:
    """``nn.LeakyReLU`` of an ``F.leaky_relu(x, negative_slope=0.01, inplace=False)`` call: its slope read from
    the node (positional or keyword); None where the slope is not a number (a graph value: no fixed table)."""
    slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    if isinstance(slope, bool) or not isinstance(slope, (int, float)):
        return None
    return nn.LeakyReLU(float(slope))


def _plain(cls: type[nn.Module]):
    return lambda node: cls()


#: function -> builder(node) of the float module it applies (None: not a lookup table)
_LUT_FUNCS = {F.hardswish: _plain(nn.Hardswish), F.hardsigmoid: _plain(nn.Hardsigmoid), F.silu: _plain(nn.SiLU),
              torch.sigmoid: _plain(nn.Sigmoid), F.sigmoid: _plain(nn.Sigmoid), torch.tanh: _plain(nn.Tanh),
              F.tanh: _plain(nn.Tanh), F.leaky_relu: _leaky_relu_module, F.leaky_relu_: _leaky_relu_module}
_LUT_METHODS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
#: nodes that move codes without changing them (with the ReLU-like clamps of :func:`is_relu`)
_CODE_MOVES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_CODE_MOVE_FUNCS = {torch.flatten, F.max_pool2d, torch.max_pool2d, F.dropout, torch.permute, torch.transpose}
_CODE_MOVE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "squeeze", "unsqueeze"}


def _gives_codes(node, modules: dict[str, nn.Module]) -> bool:
    """Whether integer inference holds ``node``'s value as codes on a grid: the output of a quantized tensor op
    (QAdd, QCat, QMul, QAct with an output quantizer), also after ReLU-like clamps, max pools and moves."""
    while isinstance(node, fx.Node):
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, (QAdd, QCat, QMul, QAct)):
            return mod.out_quant is not None
        moves = isinstance(mod, _CODE_MOVES) or (node.op == "call_function" and node.target in _CODE_MOVE_FUNCS) or (
            node.op == "call_method" and node.target in _CODE_MOVE_METHODS)
        if not (moves or is_relu(node, modules)) or not node.args:
            return False
        node = node.args[0]
    return False


def _fresh_act(act: nn.Module) -> nn.Module:
    """A copy of an activation module that does not work in place (it reads a quantizer's output)."""
    act = copy.deepcopy(act)
    if getattr(act, "inplace", False):
        act.inplace = False
    return act


def _replace_node(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, args: tuple) -> fx.Node:
    """Register ``module`` as ``name`` and let a call of it with ``args`` take the place of ``node``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


_SHAPE_ARITH = {operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv}


def _shape_like(node) -> bool:
    """Whether a node computes a Python number or shape (``x.size()``, ``x.shape``, their items and arithmetic)
    rather than a tensor."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in ("size", "dim", "numel"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    return node.op == "call_function" and node.target in _SHAPE_ARITH and any(_shape_like(a) for a in node.args)


def _tensor_pair(node: fx.Node) -> bool:
    return len(node.args) == 2 and not node.kwargs and all(
        isinstance(a, fx.Node) and not _shape_like(a) for a in node.args)


def _cat_inputs(node: fx.Node) -> tuple[list[fx.Node], int] | None:
    """(tensors, dim) of a ``torch.cat`` node whose inputs are all graph values; None otherwise."""
    xs = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(xs, (list, tuple)) or not all(isinstance(x, fx.Node) for x in xs) or not isinstance(dim, int):
        return None
    return list(xs), dim


def _lut_activation(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The float activation module a node applies, if integer inference runs it as a lookup table."""
    if node.op == "call_module":
        mod = modules[node.target]
        return mod if isinstance(mod, _LUT_MODULES) else None
    if node.op == "call_function" and node.target in _LUT_FUNCS:
        return _LUT_FUNCS[node.target](node)
    if node.op == "call_method" and node.target in _LUT_METHODS:
        return _LUT_METHODS[node.target]()
    return None


class _TensorOps:
    """State of one :func:`quantize_adds` pass: the modules, a counter per kind of inserted module."""

    def __init__(self, gm: fx.GraphModule, make_quantizer):
        self.gm, self.make = gm, make_quantizer
        self.modules = dict(gm.named_modules())
        self.counts = {"qadd": 0, "qcat": 0, "qmul": 0, "qact": 0, "wrapped": 0}

    def name(self, kind: str) -> str:
        self.counts[kind] += 1
        return f"{kind}_{self.counts[kind] - 1}"

    def replace(self, node: fx.Node, kind: str, module: nn.Module, args: tuple) -> None:
        name = self.name(kind)
        _replace_node(self.gm, node, name, module, args)
        self.modules[name] = module

    def as_codes(self, x: fx.Node, before: fx.Node) -> fx.Node:
        """``x``, or ``x`` through an identity :class:`QAct` (its own quantizer) where it is not codes yet."""
        if _gives_codes(x, self.modules):
            return x
        q = self.make()
        if q is None:
            return x
        name = self.name("qact")
        self.modules[name] = QAct(None, None, q)
        self.gm.add_submodule(name, self.modules[name])
        with self.gm.graph.inserting_before(before):
            return self.gm.graph.call_module(name, (x,))

    def activation(self, node: fx.Node, act: nn.Module) -> None:
        qin = None if _gives_codes(node.args[0], self.modules) else self.make()
        module = QAct(_fresh_act(act), qin, self.make())
        if node.op == "call_module":  # wrapped where it is: same name, same graph node
            set_module(self.gm, node.target, module)
            self.modules[node.target] = module
            self.counts["wrapped"] += 1
        else:
            self.replace(node, "qact", module, (node.args[0],))

    def visit(self, node: fx.Node) -> None:
        if node.op == "call_function" and node.target in _ADD_FUNCS and _tensor_pair(node):
            self.replace(node, "qadd", QAdd(self.make()), tuple(node.args))
        elif node.op == "call_function" and node.target in _CAT_FUNCS and _cat_inputs(node) is not None:
            xs, dim = _cat_inputs(node)
            self.replace(node, "qcat", QCat(self.make(), dim), tuple(xs))
        elif node.op == "call_function" and node.target in _MUL_FUNCS and _tensor_pair(node):
            a = self.as_codes(node.args[0], node)
            b = a if node.args[1] is node.args[0] else self.as_codes(node.args[1], node)
            self.replace(node, "qmul", QMul(self.make()), (a, b))
        elif node.op in ("call_module", "call_function", "call_method") and node.args and isinstance(
                node.args[0], fx.Node) and (act := _lut_activation(node, self.modules)) is not None:
            self.activation(node, act)


def quantize_adds(gm: fx.GraphModule, make_quantizer) -> int:
    """Give integer-only inference a quantized module for every tensor op it runs on codes (in place; call
    ``gm.recompile()`` afterwards); returns how many. Each output quantizer is ``make_quantizer()``:

    * a tensor-tensor add becomes ``QAdd`` (``qadd_<i>``), a ``torch.cat`` ``QCat`` (``qcat_<i>``), a
      tensor-tensor product ``QMul`` (``qmul_<i>``; an operand that is not already codes first passes an identity
      ``QAct``, its own quantizer: the product is taken of codes);
    * a Hardswish / Hardsigmoid / SiLU / Sigmoid / Tanh / LeakyReLU (module, function or method; a
      ``F.leaky_relu`` keeps the ``negative_slope`` of its call) becomes ``QAct`` with an input quantizer (unless
      its input already is codes) and an output quantizer: the lookup table of integer inference maps input
      codes to output codes. A module is wrapped under its own name."""
    ops = _TensorOps(gm, make_quantizer)
    for node in list(gm.graph.nodes):
        ops.visit(node)
    return sum(ops.counts.values())


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
    """(name, layer) of every quantized layer whose weight quantizer is a :class:`VNQQuantizer`; a layer with no
    variational version (QConv1d, QConvTranspose2d) is refused by name."""
    out = []
    for n, m in model.named_modules():
        if not (isinstance(m, QUANTIZED_LAYERS) and isinstance(m.weight_quant, VNQQuantizer)):
            continue
        if not isinstance(m, (QConv2d, QLinear)):
            raise ValueError(f"layer {n!r} ({type(m).__name__}) has no variational (VNQ) version: VNQ trains Conv2d "
                             f"and Linear layers; leave it in float with an override {{pattern: {n!r}, skip: true}}")
        out.append((n, m))
    return out


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
    """(name, module) of every quantized weight layer (QConv1d / QConv2d / QConvTranspose2d / QLinear)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)]

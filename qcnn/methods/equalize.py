"""Cross-layer equalization (CLE) and high-bias absorption: Nagel, van Baalen, Blankevoort, Welling,
"Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019 (sections 4.1, 4.2).

Both functions work **in place** on a ``torch.fx.GraphModule`` (e.g. what :func:`qcnn.methods.quantize`
returns, before any calibration pass) or on a traceable float ``nn.Module`` (traced with
:func:`qcnn.transform.trace`; the module's own layers are edited). Every ``Conv2d -> BatchNorm2d`` (the BN the
conv's only user) is folded first, in place, with the BN's running statistics (the model is treated as in
eval mode): ``W' = W gamma / sqrt(var + eps)``, ``b' = (b - mean) gamma / sqrt(var + eps) + beta``; the BN
becomes an ``nn.Identity``.

**Pairs.** ``layer1 -> [activation / passthroughs] -> layer2`` where layer1 is a Conv2d (any groups) or Linear,
layer2 a Conv2d with ``groups == 1``, a depthwise Conv2d (``groups == in == out channels``) or a Linear, and
every tensor on the way has a single user (a tensor that also feeds a residual add is never rescaled). On the
way: ReLU / LeakyReLU (positively homogeneous: ``f(x / s) = f(x) / s`` for ``s > 0``; also the ``QAct``
lookup-table wrapper :func:`qcnn.methods.quantize` puts around a LeakyReLU, whose quantizers calibrate
afterwards), Identity, Dropout
(eval), and between a conv and what follows it, max / average pooling (per channel, positively homogeneous)
and a flatten when it yields exactly the channels (``Linear.in_features == out_channels``, i.e. after a
global pool). ReLU6 / Hardtanh(0, 6) is not positively homogeneous. ``relu6="clip"`` (the default) turns it into
a :class:`qcnn.nn.layers.ChannelClamp` whose per-channel bound follows the scales (``relu6(x) / s_i =
clamp(x / s_i, 0, 6 / s_i)``), so the function is kept exactly; ``relu6="relu"`` replaces it by ReLU (the
paper's choice; the network changes where activations exceed 6, which on MobileNetV2 and real ImageNet images
alone limits the logits to 18.3 dB SQNR against the original network, see docs/ptq.md); both are recorded in
:attr:`EqualizeReport.relu6_replaced`; ``relu6="skip"`` leaves such pairs alone. A functional ``F.relu6`` can
only be rewritten in a GraphModule given by the caller: in a plain module (whose ``forward`` is its own code)
such a pair is skipped; ReLU6 *modules* are swapped in the module itself. A layer module called at
more than one place in the graph (shared weights) is never rescaled.

**Equalization.** For output channel ``i`` of layer1, ``r1_i = max |W1[i, ...]|`` and ``r2_i = max |W2[:, i,
...]|`` (for a depthwise layer2, ``max |W2[i]|``). With::

    s_i = (1 / r2_i) * sqrt(r1_i * r2_i)          (s_i = 1 where r1_i or r2_i is 0)
    W1[i] /= s_i,   b1[i] /= s_i,   W2[:, i] *= s_i

both ranges become ``sqrt(r1_i r2_i)`` and, as ``f(x / s) = f(x) / s``, the network computes the same
function. Chains such as MobileNetV2's ``1x1 expand -> dw 3x3 -> 1x1 project`` (pairs ``(a, dw)`` and
``(dw, b)``) are equalized pair after pair, sweep after sweep, until the largest ``|s_i - 1|`` of a sweep is
below ``tol`` or ``iterations`` sweeps ran.

**High-bias absorption** (section 4.2). For a pair with ReLU (or nothing) between the layers, if layer1's
pre-activation channel ``i`` is ``~ N(beta_i, gamma_i)``, then ``c_i = max(0, beta_i - n_sigma gamma_i)``
is below almost all of its values, so ``relu(x_i - c_i) = relu(x_i) - c_i`` and::

    b1[i] -= c_i,      b2 += sum_{kernel} W2[:, i] * c_i      (depthwise layer2: b2[i] += c_i sum W2[i])

keeps the function while shrinking the activation range the next quantizer must cover. ``beta``/``gamma``
are the per-channel mean / std of layer1's output measured on ``calib_batches`` (quantizers bypassed), or,
without data, the BatchNorm's ``beta`` / ``|gamma|`` of a not yet folded Conv->BN. The compensation is exact
for linear layers, 1x1 convs and unpadded convs; with zero padding the border outputs change (padded taps
see 0 instead of ``c_i``), and likewise for average pooling that counts padding.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from qcnn.nn.layers import ChannelClamp, QAct, QAdd, QConvBn2d
from qcnn.quant.fixed_point import FixedPointQuantizer
from qcnn.quant.uniform import UniformQuantizer
from qcnn.transform import _is_passthrough, clip_bounds, is_relu, node_is_one_of, set_module, trace

__all__ = ["EqualizeReport", "PotAlignReport", "absorb_high_bias", "align_pot_activations", "cross_layer_equalize",
           "equalization_pairs", "scale_residual_stream"]

RELU6_MODES = ("clip", "relu", "skip")

#: kinds of passthrough step: "act" elementwise, "pool" spatial per channel, "gpool" global spatial pool (to 1x1),
#: "gmean" global mean to (N, C), "flat" a reshape to (N, features); anything else ends the chain
_MODULE_KINDS = ((nn.Flatten, "flat"), (nn.Dropout, "act"), (nn.Identity, "act"), (nn.MaxPool2d, "pool"),
                 (nn.AvgPool2d, "pool"), (nn.AdaptiveAvgPool2d, "gpool"))
_FUNC_KINDS = {torch.flatten: "flat", F.dropout: "act", F.max_pool2d: "pool", F.avg_pool2d: "pool",
               F.adaptive_avg_pool2d: "gpool"}
_METHOD_KINDS = {"view": "flat", "reshape": "flat", "flatten": "flat", "contiguous": "act", "mean": "gmean"}
_HOMOGENEOUS_FUNCS = {F.leaky_relu}


@dataclass
class EqualizeReport:
    """What :func:`cross_layer_equalize` did."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  #: (layer1, layer2) module names equalized
    iterations: int = 0  #: sweeps run
    range_spread_before: dict[str, float] = field(default_factory=dict)  #: layer1 -> max r1_i / median r1_i
    range_spread_after: dict[str, float] = field(default_factory=dict)
    relu6_replaced: list[str] = field(default_factory=list)  #: ReLU6 / Hardtanh(0, 6) nodes now ReLU


@dataclass
class _Pair:
    first: str
    second: str
    bounded: list[fx.Node]  #: ReLU6-like nodes between the layers
    activated: bool  #: some activation between the layers (else linear)


# ----------------------------------------------------------------------------------------------- graph


def _graph_of(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"cross-layer equalization needs an nn.Module, got {type(model).__name__}")
    gm = trace(model)
    if gm is None:
        raise ValueError(f"{type(model).__name__} cannot be traced by torch.fx: cross-layer equalization needs "
                         "an fx-traceable model (its graph tells which layers feed which)")
    return gm


def _set_everywhere(model: nn.Module, gm: fx.GraphModule, name: str, new: nn.Module) -> None:
    set_module(gm, name, new)
    if model is not gm:
        set_module(model, name, new)


@torch.no_grad()
def _fold_bn_inplace(model: nn.Module, gm: fx.GraphModule) -> dict[str, tuple[Tensor, Tensor]]:
    """Fold every Conv2d -> BatchNorm2d (BN the conv's only user) into the conv, in place; the BN becomes an
    Identity. Returns {conv name: (BN beta, |BN gamma|)}: the pre-activation statistics of the folded conv."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    stats = {}
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if not (isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None and isinstance(src, fx.Node)
                and src.op == "call_module" and len(src.users) == 1 and calls[src.target] == calls[node.target] == 1):
            continue
        conv = modules[src.target]
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, QConvBn2d):
            continue
        w, b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias)
        conv.weight, conv.bias = w, b
        gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones_like(bn.running_var)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
        stats[src.target] = (beta.clone(), gamma.clone())
        _set_everywhere(model, gm, node.target, nn.Identity())
    return stats


def _is_layer(m: nn.Module | None) -> bool:
    """A plain Conv2d / Linear (or QConv2d / QLinear) holding only ``weight`` and ``bias``."""
    if not isinstance(m, (nn.Conv2d, nn.Linear)) or isinstance(m, QConvBn2d):
        return False
    return {n for n, _ in m.named_parameters(recurse=False)} <= {"weight", "bias"}


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels


def _global_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` (or (-2, -1)), without keepdim: a global average pool to (N, C)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return len(dims) == 2 and {d % 4 for d in dims if isinstance(d, int)} == {2, 3} and not keep


def _flatten_from_1(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten that keeps the batch dim (view / reshape: only trusted after a global pool)."""
    if node.op == "call_module":
        return modules[node.target].start_dim == 1
    if node.target in ("view", "reshape"):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return start == 1


def _pool_kind(output_size) -> str:
    return "gpool" if output_size in (1, (1, 1)) else "pool"


def _passthrough_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        m = modules[node.target]
        kind = next((k for t, k in _MODULE_KINDS if isinstance(m, t)), None)
        return _pool_kind(m.output_size) if kind == "gpool" else kind
    if node.op == "call_method":
        kind = _METHOD_KINDS.get(node.target)
        return ("gmean" if _global_mean(node) else None) if kind == "gmean" else kind
    kind = _FUNC_KINDS.get(node.target)
    if kind == "gpool":
        return _pool_kind(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    return kind


def _step_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """How a node between two layers acts on its input: act / bounded / pool / gpool / gmean / flat, or None."""
    bounds = clip_bounds(node, modules)
    if bounds is not None and not (isinstance(bounds[1], float) and bounds[1] == float("inf")):
        return "bounded" if bounds[0] == 0 else None  # ReLU6 / Hardtanh / ChannelClamp: not homogeneous
    if is_relu(node, modules) or (node.op == "call_function" and node.target in _HOMOGENEOUS_FUNCS):
        return "act"
    if node.op == "call_module" and isinstance(modules[node.target], nn.LeakyReLU):
        return "act"
    if node.op == "call_module" and isinstance(modules[node.target], QAct) and isinstance(
            modules[node.target].act, nn.LeakyReLU):  # wrapped by qcnn.quantize, its quantizers not yet calibrated
        return "act"
    return _passthrough_kind(node, modules) if _is_passthrough(node, modules) else None


def _second_ok(l1: nn.Module, l2: nn.Module, flat: bool) -> bool:
    channels = l1.out_channels if isinstance(l1, nn.Conv2d) else l1.out_features
    if isinstance(l2, nn.Linear):
        return l2.in_features == channels and (isinstance(l1, nn.Linear) or flat)
    if isinstance(l1, nn.Linear) or flat:
        return False
    return l2.in_channels == channels and (l2.groups == 1 or _depthwise(l2))


def _users(node: fx.Node) -> list[fx.Node]:
    """Consumers of ``node``'s values (``x.size(...)`` / ``x.shape`` read no value and are left out)."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in ("size", "dim"))
            and not (u.op == "call_function" and u.target is getattr)]


def _walk(start: fx.Node, modules: dict[str, nn.Module], conv: bool):
    """Follow the single-user chain after ``start``: (layer2 node or None, kinds seen, bounded nodes)."""
    node, kinds, bounded = start, [], []
    while len(_users(node)) == 1:
        nxt = _users(node)[0]
        if not nxt.args or nxt.args[0] is not node or any(a is node for a in nxt.args[1:]):
            return None, kinds, bounded
        if nxt.op == "call_module" and _is_layer(modules[nxt.target]):
            return nxt, kinds, bounded
        kind = _step_kind(nxt, modules)
        if kind is None or (not conv and kind not in ("act", "bounded")):
            return None, kinds, bounded
        pooled = any(k in ("gpool", "gmean") for k in kinds)
        if kind == "flat" and not (pooled or _flatten_from_1(nxt, modules)):
            return None, kinds, bounded
        bounded += [nxt] if kind == "bounded" else []
        kinds.append(kind)
        node = nxt
    return None, kinds, bounded


def _pair_from(node: fx.Node, modules: dict[str, nn.Module], calls: Counter, relu6: str,
               editable: bool) -> _Pair | None:
    l1 = modules[node.target]
    second, kinds, bounded = _walk(node, modules, isinstance(l1, nn.Conv2d))
    if second is None or calls[node.target] > 1 or calls[second.target] > 1:
        return None
    if not _second_ok(l1, modules[second.target], any(k in ("flat", "gmean") for k in kinds)):
        return None
    if bounded and (relu6 == "skip" or not all(_replaceable(b, calls, editable) for b in bounded)):
        return None
    return _Pair(node.target, second.target, bounded, any(k in ("act", "bounded") for k in kinds))


def _replaceable(node: fx.Node, calls: Counter, editable: bool) -> bool:
    """A ReLU6 module called once, or (in a GraphModule given by the caller) a ReLU6 function node."""
    return calls[node.target] == 1 if node.op == "call_module" else editable


def equalization_pairs(gm: fx.GraphModule, relu6: str = "relu", editable: bool = True) -> list[_Pair]:
    """The (layer1, layer2) pairs of ``gm`` that can be rescaled (see the module docstring), in graph order."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and _is_layer(modules[node.target]):
            p = _pair_from(node, modules, calls, relu6, editable)
            if p is not None:
                pairs.append(p)
    return pairs


def _replace_relu6(model: nn.Module, gm: fx.GraphModule, pairs: list[_Pair], mode: str) -> dict[str, list]:
    """ReLU6-like nodes between pairs become ReLU (``mode="relu"``) or a :class:`ChannelClamp` whose bounds
    follow the scales (``"clip"``). Returns ``{"replaced": names, "clamps": {pair first layer: clamps}}``."""
    modules = dict(gm.named_modules())
    names, clamps = [], {}
    for p in pairs:
        for node in p.bounded:
            if node.op == "call_module" and isinstance(modules[node.target], ChannelClamp):
                clamps.setdefault(p.first, []).append(modules[node.target])  # equalized before: keep it
                continue
            w, hi = modules[p.first].weight, clip_bounds(node, modules)[1]
            new = (ChannelClamp(torch.full((w.shape[0],), hi, dtype=w.dtype, device=w.device))
                   if mode == "clip" else nn.ReLU(inplace=bool(getattr(modules.get(node.target), "inplace", False))))
            if node.op == "call_module":
                _set_everywhere(model, gm, node.target, new)
                names.append(node.target)
            elif mode == "clip":
                target = f"{node.name}_clamp"
                gm.add_submodule(target, new)
                node.op, node.target, node.args, node.kwargs = "call_module", target, (node.args[0],), {}
                names.append(node.name)
            else:
                node.target, node.args, node.kwargs = F.relu, (node.args[0],), {}
                names.append(node.name)
            if mode == "clip":
                clamps.setdefault(p.first, []).append(new)
    if names:
        gm.graph.lint()
        gm.recompile()
    return {"replaced": names, "clamps": clamps}


# ----------------------------------------------------------------------------------------------- math


def _out_range(m: nn.Module) -> Tensor:
    """r1: max |W[i, ...]| per output channel."""
    return m.weight.detach().abs().flatten(1).amax(1)


def _in_range(m: nn.Module) -> Tensor:
    """r2: max |W[:, i, ...]| per input channel (a depthwise conv: per channel kernel)."""
    w = m.weight.detach().abs()
    return w.flatten(1).amax(1) if _depthwise(m) else w.transpose(0, 1).flatten(1).amax(1)


@torch.no_grad()
def _scale_out(m: nn.Module, s: Tensor) -> None:
    m.weight.div_(s.reshape(-1, *[1] * (m.weight.dim() - 1)))
    if m.bias is not None:
        m.bias.div_(s)


@torch.no_grad()
def _scale_in(m: nn.Module, s: Tensor) -> None:
    if _depthwise(m):
        m.weight.mul_(s.reshape(-1, 1, 1, 1))
    else:
        m.weight.mul_(s.reshape(1, -1, *[1] * (m.weight.dim() - 2)))


def _equalize_pair(l1: nn.Module, l2: nn.Module, clamps=()) -> float:
    """One rescaling of a pair (and of the per-channel clamps between them); returns max |s_i - 1|."""
    r1, r2 = _out_range(l1), _in_range(l2)
    ok = (r1 > 0) & (r2 > 0)
    safe = torch.where(ok, r2, torch.ones_like(r2))
    s = torch.where(ok, torch.sqrt(r1 * safe) / safe, torch.ones_like(r2))
    _scale_out(l1, s)
    _scale_in(l2, s)
    for c in clamps:
        c.upper.div_(s.to(c.upper))
    return float((s - 1).abs().max()) if s.numel() else 0.0


def _spread(m: nn.Module) -> float:
    r = _out_range(m)
    med = float(r.median())
    return float(r.max()) / med if med > 0 else float("inf")


def cross_layer_equalize(model: nn.Module, iterations: int = 20, tol: float = 1e-4,
                         relu6: str = "clip") -> EqualizeReport:
    """Cross-layer equalization of ``model`` in place (see the module docstring); BN is folded first.

    ``iterations``: most sweeps over all pairs; ``tol``: stop once a sweep's largest ``|s_i - 1|`` is below;
    ``relu6``: ``"clip"`` (a ReLU6 between a pair becomes a per-channel clamp: the function is kept),
    ``"relu"`` (replaced by ReLU, the paper's choice) or ``"skip"`` (leave those pairs).
    """
    if relu6 not in RELU6_MODES:
        raise ValueError(f"relu6={relu6!r} is not one of {RELU6_MODES}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations={iterations!r} must be a positive integer")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be positive")
    gm = _graph_of(model)
    _fold_bn_inplace(model, gm)
    pairs = equalization_pairs(gm, relu6, editable=gm is model)
    report = EqualizeReport(pairs=[(p.first, p.second) for p in pairs])
    replaced = _replace_relu6(model, gm, pairs, relu6)
    report.relu6_replaced = replaced["replaced"]
    modules = dict(gm.named_modules())
    report.range_spread_before = {p.first: _spread(modules[p.first]) for p in pairs}
    for sweep in range(1, iterations + 1 if pairs else 1):
        report.iterations = sweep
        if max(_equalize_pair(modules[p.first], modules[p.second], replaced["clamps"].get(p.first, ()))
               for p in pairs) < tol:
            break
    report.range_spread_after = {p.first: _spread(modules[p.first]) for p in pairs}
    return report


# ----------------------------------------------------------------------------------- bias absorption


@contextmanager
def _float_forward(model: nn.Module):
    """Bypass every quantizer slot of the quantized layers (input, weight, output): the float network."""
    saved = []
    for m in model.modules():
        for attr in ("input_quant", "weight_quant", "out_quant"):
            if isinstance(getattr(m, attr, None), nn.Module):
                saved.append((m, attr, getattr(m, attr)))
                setattr(m, attr, None)
    try:
        yield model
    finally:
        for m, attr, q in saved:
            setattr(m, attr, q)


@torch.no_grad()
def _float_pass(gm: fx.GraphModule, batches, handles: list) -> None:
    """One eval-mode pass of ``gm`` over ``batches`` (tensors or (x, y) tuples, or one tensor) with every
    quantizer bypassed, for the hooks ``handles``, which are removed afterwards."""
    was_training = gm.training
    try:
        with _float_forward(gm):
            gm.eval()
            for b in [batches] if isinstance(batches, Tensor) else batches:
                gm(b[0] if isinstance(b, (tuple, list)) else b)
    finally:
        gm.train(was_training)
        for h in handles:
            h.remove()


@torch.no_grad()
def _measure(gm: fx.GraphModule, names: list[str], batches: Iterable) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel (mean, std) of each named layer's output over ``batches`` (tensors or (x, y) tuples)."""
    acc: dict[str, list] = {}

    def hook(name):
        def fn(mod, inp, out):
            y = out.detach().double().movedim(1 if isinstance(mod, nn.Conv2d) else -1, 0).flatten(1)
            s = acc.setdefault(name, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + y.sum(1), s[1] + (y * y).sum(1), s[2] + y.shape[1]
        return fn

    _float_pass(gm, batches, [gm.get_submodule(n).register_forward_hook(hook(n)) for n in names])
    if not acc:
        raise ValueError("absorb_high_bias: calib_batches is empty, no batch was seen")
    out = {}
    for n, (s, ss, count) in acc.items():
        mean = s / count
        out[n] = (mean, (ss / count - mean * mean).clamp_min(0).sqrt())
    return out


@torch.no_grad()
def _absorb(l1: nn.Module, l2: nn.Module, c: Tensor) -> None:
    c = c.to(l1.weight.dtype)
    if l1.bias is None:
        l1.bias = nn.Parameter(torch.zeros_like(c))
    if l2.bias is None:
        l2.bias = nn.Parameter(torch.zeros(l2.weight.shape[0], dtype=l2.weight.dtype, device=l2.weight.device))
    l1.bias.sub_(c)
    w = l2.weight.detach()
    if _depthwise(l2):
        l2.bias.add_(w.flatten(1).sum(1) * c)
    else:
        l2.bias.add_(w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ c)


def absorb_high_bias(model: nn.Module, calib_batches=None, n_sigma: float = 3.0) -> int:
    """High-bias absorption in place (see the module docstring); returns the number of channels changed.

    ``calib_batches``: iterable of input tensors or ``(x, y)`` batches (or one tensor) on which the
    per-channel mean / std of each layer1 output is measured; ``None``: taken from the BatchNorm after
    layer1 (folded here), and a ValueError if no eligible pair has one. BN is folded first.
    """
    if not n_sigma >= 0:
        raise ValueError(f"n_sigma={n_sigma!r} must be >= 0")
    gm = _graph_of(model)
    bn_stats = _fold_bn_inplace(model, gm)
    pairs = equalization_pairs(gm, "skip", editable=False)
    if calib_batches is not None:
        stats = _measure(gm, sorted({p.first for p in pairs}), calib_batches) if pairs else {}
    else:
        stats = {p.first: bn_stats[p.first] for p in pairs if p.first in bn_stats}
        if pairs and not stats:
            raise ValueError("absorb_high_bias needs calib_batches: no BatchNorm statistics are left after the "
                             "layers (already folded) to estimate their pre-activations from")
    modules = dict(gm.named_modules())
    changed = 0
    for p in pairs:
        if p.first not in stats:
            continue
        beta, gamma = stats[p.first]
        c = (beta - n_sigma * gamma).clamp_min(0).to(modules[p.first].weight.device)
        _absorb(modules[p.first], modules[p.second], c)
        changed += int((c > 0).sum())
    return changed


# ------------------------------------------------------------------------------ power-of-two alignment


def _is_pot(q) -> bool:
    return isinstance(q, FixedPointQuantizer) or (isinstance(q, UniformQuantizer) and q.pot and q.symmetric
                                                  and q.observer is not None)


def _pot_act_quant(m: nn.Module):
    """The input quantizer of layer ``m`` when its grid is a power of two with zero point 0 and it is not yet
    calibrated (QCode's fixed point, a symmetric power-of-two uniform grid); else None."""
    q = getattr(m, "input_quant", None)
    return q if _is_pot(q) and not q.observer.is_initialized() else None


@dataclass
class PotAlignReport:
    """What :func:`align_pot_activations` did."""

    pairs: list[tuple[str, str]] = field(default_factory=list)  #: (layer1, layer2) whose activation was aligned
    factors: dict[str, float] = field(default_factory=dict)  #: layer2 -> the factor c its input now carries
    skipped: list[str] = field(default_factory=list)  #: layer2 of pairs whose input grid is not power-of-two
    #: residual streams scaled as a whole: (the layers writing into it, the factor c)
    streams: list[tuple[list[str], float]] = field(default_factory=list)


def _is_add(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (node.op == "call_module" and isinstance(modules[node.target], QAdd)) or (
        node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "add_"))


@dataclass
class _Stream:
    producers: list[str]  #: layers whose output enters the stream (scaled by c)
    consumers: list[str]  #: layers reading the stream (weights divided by c)
    adds: list[str]  #: QAdd modules on the stream (their output quantizers see c x)


def _stream_groups(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[_Stream]:
    """The residual streams of ``gm``: tensors joined by additions and scale-transparent ops, with every value
    entering from a layer and every value leaving into a layer (else the stream cannot be rescaled exactly)."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    seen: set[fx.Node] = set()
    streams = []
    for seed in gm.graph.nodes:
        if seed in seen or not _is_add(seed, modules):
            continue
        inner, producers, consumers, ok, todo = set(), set(), set(), True, [seed]
        while todo:
            node = todo.pop()
            if node in inner or node in producers:
                continue
            if node.op == "call_module" and _is_layer(modules[node.target]):
                producers.add(node)
            elif _is_add(node, modules) or _transparent(node, modules):
                inner.add(node)
                todo += list(node.all_input_nodes)
            else:
                ok = False  # the input, a constant, a non-homogeneous op: the stream cannot carry a factor
                continue
            for u in _users(node):
                if u.op == "call_module" and _is_layer(modules[u.target]) and u.args and u.args[0] is node \
                        and len(u.all_input_nodes) == 1:
                    consumers.add(u)
                elif _is_add(u, modules) or _transparent(u, modules):
                    todo.append(u)
                else:
                    ok = False
        seen |= inner
        layers = producers | consumers
        if ok and all(calls[n.target] == 1 for n in layers) and not (producers & consumers):
            streams.append(_Stream(sorted(n.target for n in producers), sorted(n.target for n in consumers),
                                   sorted(n.target for n in inner if n.op == "call_module"
                                          and isinstance(modules[n.target], QAdd))))
    return streams


def _pot_error(x: Tensor, s: float, q) -> Tensor:
    """Relative squared error of ``x`` on the power-of-two grid of ``q`` whose free step would be ``s``."""
    step = 2.0 ** math.ceil(math.log2(s))
    xq = (x / step).round().clamp(q.qmin, q.qmax) * step
    return ((xq - x) ** 2).sum() / (x * x).sum().clamp_min(1e-30)


@torch.no_grad()
def align_pot_activations(model: nn.Module, calib_batches) -> PotAlignReport:
    """Scale the activation between each rescalable pair so that its calibrated step is a power of two.

    A power-of-two grid (QCode's ``2^-fl``) can only place its step on powers of two, so an activation whose
    best free step is ``s* = t* / q_max`` (``t*``: the range the quantizer's own observer picks on the
    calibration images, ``q_max = 2^B - 1`` unsigned, ``2^(B-1) - 1`` signed) gets the step ``2^ceil(log2 s*)``:
    up to twice as coarse, 1/3 more noise power on average. For a pair ``layer1 -> f -> layer2`` of
    :func:`equalization_pairs` (``f`` positively homogeneous, or a per-channel clamp left by cross-layer
    equalization) the activation can be multiplied by any ``c > 0`` without changing the function::

        W1 <- c W1,  b1 <- c b1,  clamp bounds <- c bounds,  W2 <- W2 / c

    and ``c = 2^ceil(log2 s*) / s*`` (in ``[1, 2)``) makes ``c s*`` a power of two: the calibrated power-of-two
    grid of ``c x`` then has exactly the free-scale grid's step and clipping range, relative to the signal.
    The weights' own power-of-two grids move by the same factors (their alignment changes at random).

    Only pairs whose layer2 quantizes its input on a not yet calibrated power-of-two grid (a
    :class:`~qcnn.quant.fixed_point.FixedPointQuantizer`, or a symmetric ``pot`` uniform grid) are aligned; a
    ReLU6 between the layers is aligned once cross-layer equalization made it a per-channel clamp (a ReLU6 is
    not positively homogeneous), otherwise the pair is left. The ranges are measured on ``calib_batches`` with
    every quantizer bypassed (one pass, each quantizer's observer type), before calibration; every tensor that
    also feeds a residual add is left to the stream step.

    Residual streams: the tensors joined by additions (and ReLU, padding, pooling, slicing between them) can only
    be scaled together: every layer writing into the stream (the blocks' last convs, a stem) times ``c``,
    every layer reading it (the next blocks' first convs, a classifier) over ``c``, which keeps the function as
    long as every value enters and leaves the stream through a layer. One factor serves all the stream's
    quantizers (the inputs of its readers and the outputs of its quantized adds), so it is the ``c`` in
    ``2^(j/32)``, ``j = 0 .. 31``, with the least summed relative error of those quantizers on their power-of-two
    grids (on a sample of each tensor). Works in place on what :func:`qcnn.methods.quantize` returns.
    Measured on MobileNetV2 (docs/RESULTS.md): per-tensor QCode W8A8 after CLE, with bias correction, 15.14 dB
    logit SQNR without alignment, 16.39 with the pairs aligned, 17.02 with the streams too.
    """
    gm = _graph_of(model)
    modules = dict(gm.named_modules())
    report = PotAlignReport()
    pairs, streams = _pot_pairs(gm, modules, report), _pot_streams(gm, modules)
    if not pairs and not streams:
        return report
    gen = torch.Generator().manual_seed(0)

    def seen(entry, x: Tensor) -> None:
        entry[1].update(x.detach())
        flat = x.detach().flatten()
        entry[2].append(flat[torch.randint(0, flat.numel(), (min(flat.numel(), 1 << 17),), generator=gen)])

    handles = [modules[p.second].register_forward_pre_hook(lambda m, a, o=obs: o.update(a[0].detach()))
               for p, _, obs in pairs]
    for _, entries in streams:
        for n, entry in entries.items():
            if isinstance(modules[n], QAdd):
                handles.append(modules[n].register_forward_hook(lambda m, a, y, e=entry: seen(e, y)))
            else:
                handles.append(modules[n].register_forward_pre_hook(lambda m, a, e=entry: seen(e, a[0])))
    _float_pass(gm, calib_batches, handles)
    if any(not obs.is_initialized() for _, _, obs in pairs) or any(
            not e[1].is_initialized() for _, entries in streams for e in entries.values()):
        raise ValueError("align_pot_activations: calib_batches is empty, no batch was seen")
    for p, q, obs in pairs:
        t = _free_step(q, obs)
        if t is not None:
            report.factors[p.second] = _scale_pair(modules, p, 2.0 ** math.ceil(math.log2(t)) / t)
            report.pairs.append((p.first, p.second))
    for st, entries in streams:
        c = _stream_factor(entries)
        if c is None:
            continue
        for n in st.producers:
            _scale_out(modules[n], _full(modules[n].weight.shape[0], 1.0 / c, modules[n].weight))
        for n in st.consumers:
            m = modules[n]
            _scale_in(m, _full(m.weight.shape[0] if _depthwise(m) else m.weight.shape[1], 1.0 / c, m.weight))
        report.streams.append((st.producers, c))
    return report


def _scale_pair(modules: dict[str, nn.Module], p: _Pair, c: float) -> float:
    """Multiply the activation of pair ``p`` by ``c`` (layer1 and the clamps between times ``c``, layer2's
    weights over ``c``); returns ``c``."""
    l1, l2 = modules[p.first], modules[p.second]
    inv = _full(l1.weight.shape[0], 1.0 / c, l1.weight)
    _scale_out(l1, inv)
    _scale_in(l2, inv)
    for node in p.bounded:
        modules[node.target].upper.mul_(c)
    return c


def _pot_pairs(gm: fx.GraphModule, modules: dict[str, nn.Module], report: PotAlignReport) -> list:
    """(pair, its layer2's input quantizer, a fresh copy of that quantizer's observer) for every pair with a
    power-of-two input grid; the others are added to ``report.skipped``."""
    pairs = []
    for p in equalization_pairs(gm, "clip", editable=False):
        if any(not (n.op == "call_module" and isinstance(modules[n.target], ChannelClamp)) for n in p.bounded):
            continue  # a ReLU6 not yet turned into a clamp
        q = _pot_act_quant(modules[p.second])
        if q is None:
            report.skipped.append(p.second)
            continue
        pairs.append((p, q, copy.deepcopy(q.observer)))
    return pairs


def _pot_streams(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list:
    """(stream, {module: (quantizer, fresh observer, samples)}) for every stream whose quantizers are all
    power-of-two grids not yet calibrated."""
    streams = []
    for st in _stream_groups(gm, modules):
        quants = {n: modules[n].input_quant for n in st.consumers} | {n: modules[n].out_quant for n in st.adds}
        quants = {n: q for n, q in quants.items() if q is not None}
        if quants and all(_is_pot(q) and not q.observer.is_initialized() for q in quants.values()):
            streams.append((st, {n: (q, copy.deepcopy(q.observer), []) for n, q in quants.items()}))
    return streams


def _stream_factor(entries: dict) -> float | None:
    """The factor in ``2^(j / STREAM_CANDIDATES)`` with the least summed relative error of the stream's
    quantizers on their power-of-two grids (None when no quantizer saw a non-zero range)."""
    free = [(q, _free_step(q, obs), torch.cat(xs)) for q, obs, xs in entries.values()]
    free = [(q, t, x) for q, t, x in free if t is not None]
    if not free:
        return None
    cands = [2.0 ** (j / STREAM_CANDIDATES) for j in range(STREAM_CANDIDATES)]
    return min(cands, key=lambda c: float(sum(_pot_error(c * x, c * t, q) for q, t, x in free)))


#: factors tried for a residual stream: 2^(j / STREAM_CANDIDATES), j = 0 .. STREAM_CANDIDATES - 1
STREAM_CANDIDATES = 32


def _full(n: int, v: float, like: Tensor) -> Tensor:
    return torch.full((n,), v, dtype=like.dtype, device=like.device)


def _free_step(q, obs) -> float | None:
    """The free-scale step of ``q``'s grid over the range its observer ``obs`` picks (None if empty)."""
    lo, hi = obs.compute_range(q.bits, q.signed)
    t = float(torch.maximum(-lo, hi).max()) if q.signed else float(hi.max())
    return t / q.qmax if math.isfinite(t) and t > 0 else None


# ----------------------------------------------------------------------------------- stream scaling

#: ops through which a tensor scaled by c > 0 stays scaled by c (positively homogeneous, or pure indexing)
_SCALE_FUNCS = {operator.add, operator.getitem, torch.add, torch.cat, torch.flatten, F.pad, F.relu,
                F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout, F.leaky_relu}
_SCALE_METHODS = {"view", "reshape", "flatten", "contiguous", "mean", "relu", "relu_", "add", "add_"}
_SCALE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
                  nn.AdaptiveAvgPool2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _transparent(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node_is_one_of(node, modules, _SCALE_MODULES, _SCALE_FUNCS, _SCALE_METHODS)


def _feeds_add(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value reaches an addition through scale-transparent ops only."""
    todo, seen = list(_users(node)), set()
    while todo:
        u = todo.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.target in (operator.add, torch.add, "add", "add_"):
            return True
        if _transparent(u, modules):
            todo.extend(_users(u))
    return False


@torch.no_grad()
def _rescale_bn(bn: nn.Module, s_in: float, s_out: float) -> None:
    """BN seeing its input times ``s_in`` and asked for its output times ``s_out``: same function (``eps`` is
    kept, so that a checkpoint rebuilt on the stock model computes what was trained)."""
    if s_in != 1.0 and bn.running_mean is not None:
        bn.running_mean.mul_(s_in)
        bn.running_var.mul_(s_in * s_in)
    if s_out != 1.0:
        if bn.weight is None:
            raise ValueError("stream scaling needs BatchNorm layers with affine=True on the residual stream")
        bn.weight.mul_(s_out)
        bn.bias.mul_(s_out)


def scale_residual_stream(model: nn.Module, c: float, strict: bool = True) -> list[str]:
    """Scale a network's residual stream by ``c > 0`` in place without changing its function; returns the
    BatchNorm layers whose affine part now carries the factor.

    The *stream BNs* are the BatchNorms whose output reaches an addition through scale-transparent ops only
    (ReLU, pad, indexing, pooling, flatten, add): in a ResNet, the stem's BN, every block's last BN and the
    downsample BNs. Their ``gamma, beta`` are multiplied by ``c``, so every tensor of the stream (the block
    inputs, the residual adds, the pooled features) is ``c`` times the original, since ReLU, pooling and
    addition are positively homogeneous. A conv fed by the stream computes ``c W x`` (its bias, if any, is
    multiplied by ``c`` too); the BN after it sees its input times ``c`` and its running statistics follow
    (``mean c, var c^2``), so it computes the same output in eval *and* train mode up to its ``eps``, which is
    kept (it now acts as ``eps / c^2`` would have on the original input: 6e-5 for ``c = 0.4`` and the default
    1e-5, against running variances of 1e-2 to 10 on ResNet-20).
    The last layer (the classifier) divides its weight by ``c`` and the logits are unchanged. A
    non-homogeneous op on the stream (ReLU6, sigmoid, ...) is refused with its name.

    This is how a method that clips activations at a fixed level (DoReFa's ``clip(a, 0, 1)``) is given a
    pretrained ReLU network whose block inputs exceed that level: ``c = 0.5`` puts the stream's 99th
    percentile (2.1-3.0 on the CIFAR ResNet-20) near the clip. ``strict=False``: a model without a residual
    stream, or one torch.fx cannot trace, is left unchanged and ``[]`` returned (instead of a ValueError).
    """
    if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
        raise ValueError(f"stream scale c={c!r} must be a finite number > 0")
    gm = _graph_of(model) if strict or isinstance(model, fx.GraphModule) else trace(model)
    if gm is None:
        return []
    modules = dict(gm.named_modules())
    stream = {n.target for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(modules[n.target], _BN) and _feeds_add(n, modules)}
    if not stream and not strict:
        return []
    if not stream:
        raise ValueError(f"{type(model).__name__} has no BatchNorm feeding a residual addition: no stream to scale")
    layers = [n for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(modules[n.target], (nn.Conv2d, nn.Linear))]
    scale: dict[fx.Node, float] = {}
    for node in gm.graph.nodes:
        ins = {scale.get(a, 1.0) for a in node.all_input_nodes}
        s_in = max(ins) if ins else 1.0
        if len(ins) > 1 and node.op != "output":
            raise ValueError(f"stream scaling: {node.name} mixes tensors scaled by c and unscaled ones (a branch "
                             "reaches it through an op that is not positively homogeneous)")
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, _BN):
            s_out = c if node.target in stream else 1.0
            _rescale_bn(m, s_in, s_out)
            scale[node] = s_out
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            scale[node] = _rescale_layer(m, s_in, last=node is layers[-1])
        elif s_in != 1.0 and node.op != "output" and not _transparent(node, modules):
            raise ValueError(f"stream scaling cannot pass {node.name} ({node.target}): it is not positively "
                             "homogeneous")
        else:
            scale[node] = s_in
    return sorted(stream)


@torch.no_grad()
def _rescale_layer(m: nn.Module, s_in: float, last: bool) -> float:
    if s_in == 1.0:
        return 1.0
    if last:
        m.weight.div_(s_in)
        return 1.0
    if m.bias is not None:
        m.bias.mul_(s_in)
    return s_in

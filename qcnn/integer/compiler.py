"""Compiler: the ``torch.fx`` graph of a quantized model -> an :class:`~qcnn.integer.runtime.IntegerModel`.

:func:`to_integer` walks the graph of a calibrated or trained quantized model (the output of
:func:`qcnn.quantize`) and compiles it into a flat list of integer operations whose parameters are read only
from the quantizers' grids (``grid()``) and the layers' float parameters. Between quantizing the input and
dequantizing the output only integer arithmetic runs (int64 tensors):

* **conv / linear**: ``acc = sign * sum (x - z_x)(w - z_w) + bias``, ``bias = round(b / (s_x s_w))`` (int32).
  The sum is the FQN formula ``sum A W - z_w sum A - z_a sum W + N z_a z_w`` in its centred form, evaluated
  exactly (:func:`~qcnn.integer.kernels.int_conv2d`; the fan-in bound ``< 2^53`` is checked here).
* **BatchNorm** after a conv (frozen statistics) is folded into the per-channel real scale of the accumulator
  ``S = s_x s_w gamma / sigma``; a negative scale flips the sign of the channel (``sign``) so ``S > 0``.
* **requantize** an accumulator to the grid of the quantizer that consumes it (:mod:`qcnn.integer.schemes`,
  ``M = S / s_out``). ReLU / ReLU6 are folded into the clamp bounds (quantization is monotone, so
  ``quant(relu(v)) = max(quant(v), z)``); before a non-monotone consumer (average pool, add) they are clamps
  on the accumulator.
* **rescale** codes from one activation grid to another (a ReLU'd residual sum feeding a conv whose input
  quantizer has its own range), **residual add** (``QAdd``: each operand with its own multiplier, one
  rounding), **pooling** (max pool on codes, ceil mode too; average pool as an integer window sum of scale
  ``s / K``), flatten / reshape / slicing / zero padding (by ``z``) / permute / chunk move codes.
* **concatenation** (``QCat``: every input requantized to the output grid), **products** (``QMul``: the exact
  product of two code operands, requantized once), **activations** (``QAct``: Hardswish, Hardsigmoid, SiLU,
  Sigmoid, Tanh, LeakyReLU (any slope) as lookup tables from input codes to output codes, built with the
  simulation's float64 arithmetic), a **BatchNorm on codes** (DenseNet: an exact per-channel affine map,
  requantized by its consumer).

The fake-quant simulation (the quantized model in eval mode) defines the expected codes. The engine rounds
exactly once per quantizer where the simulation does, with the simulation's own rule (``x * fl32(1/s)``)
and 31-bit multipliers on int64 products (``requant="int64"``), so it reproduces the simulation evaluated in
float64 (:func:`qcnn.integer.agreement.simulation_codes` with ``dtype=torch.float64``) code for code, end to
end on ResNet-20; the float32 simulation differs from both where its own rounding error crosses a tie (see
docs/integer.md).
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qcnn.integer.ir import ActGrid, Op, index_from_json, index_to_json
from qcnn.integer.runtime import IntegerModel
from qcnn.integer.values import Emitter, Layer, Value, codes, uniform_in_windows
from qcnn.nn.layers import ChannelClamp, QAct, QAdd, QCat, QConv2d, QLinear, QMul
from qcnn.quant.base import GradientQuantizer

_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)
_FLOAT_ADDS = (operator.add, torch.add, operator.iadd)
#: tensor ops that run on codes only inside the modules qcnn.quantize puts there (quantize_adds=True)
_UNWRAPPED = {torch.cat: "concatenation", torch.concat: "concatenation", operator.mul: "product",
              torch.mul: "product", operator.imul: "product", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
              F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.tanh: "tanh",
              F.tanh: "tanh", F.leaky_relu: "leaky relu", F.leaky_relu_: "leaky relu"}
_ACTIVATION_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU)


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def node_shape(node: fx.Node) -> tuple[int, ...]:
    """Shape of the tensor ``node`` computes for the example batch of one (ShapeProp)."""
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        raise ValueError(f"node {node.name!r} has no tensor shape (unsupported multi-output node)")
    return tuple(tm.shape)


class _Weights(NamedTuple):
    codes: Tensor  # weight codes q_w, stored as ``dtype``
    zero_point: Tensor  # int32 (C,)
    scale: Tensor  # float64 (C,)
    dtype: torch.dtype
    grid: object  # the weight quantizer's Grid
    fan_in: int
    bound: float  # max |q_w - z_w|


def _weights(name: str, mod: nn.Module) -> _Weights:
    """Integer weight codes of a quantized conv / linear, checked to reproduce its fake-quantized weight."""
    if mod.weight_quant is None:
        raise ValueError(f"layer {name!r} has float weights; integer inference needs quantized weights")
    w_fq = mod.quantized_weight().detach()
    wg = mod.weight_quant.grid().integer_view()  # DoReFa / PACT odd codes and binary weights included
    if wg is None:
        raise ValueError(f"layer {name!r}: weight quantizer {type(mod.weight_quant).__name__} has a non-uniform "
                         "grid (a codebook that is not scale x integers); the integer engine needs integer weight "
                         "codes with one scale per tensor or channel")
    if wg.axis not in (None, 0):
        raise ValueError(f"layer {name!r}: per-channel weight grid along axis {wg.axis} (expected 0)")
    q = wg.to_codes(w_fq)
    co = w_fq.shape[0]
    s_w = wg.scale.to(torch.float64).reshape(-1).expand(co) if wg.scale.numel() == 1 else \
        wg.scale.to(torch.float64).reshape(-1)
    zw = wg.zero_point.reshape(-1) if wg.zero_point is not None else torch.zeros(1, dtype=torch.int32)
    zw = zw.expand(co).to(torch.int32).clone()
    # exactness check: the centred codes must reproduce the fake-quantized weight up to float32 rounding
    # (relative to the value, and to the grid's largest value: DoReFa computes 2 q / n - 1 in float32)
    shape = [-1] + [1] * (w_fq.dim() - 1)
    centred = q - zw.reshape(shape)
    recon = centred.double() * s_w.reshape(shape)
    top = float(centred.abs().max()) if centred.numel() else 0.0
    if not torch.allclose(recon, w_fq.double(), rtol=1e-5, atol=1e-6 * max(1.0, top) * float(s_w.max())):
        raise ValueError(f"layer {name!r}: the weight quantizer's output is not on its reported grid")
    dtype = torch.int8 if wg.qmin >= -128 and wg.qmax <= 127 else (
        torch.uint8 if wg.qmin >= 0 and wg.qmax <= 255 else torch.int16 if wg.bits <= 16 else torch.int32)
    bound = float((q - zw.reshape(shape)).abs().max()) if q.numel() else 0.0
    return _Weights(q, zw, s_w, dtype, wg, w_fq[0].numel(), bound)


def _real_bias(mod: nn.Module, channels: int) -> Tensor:
    """The layer's bias as float64, on its bias grid where it has one (float32 would round those values)."""
    bq = getattr(mod, "bias_quant", None)
    if bq is not None and mod.bias is not None:
        b = bq(mod.bias.detach().to(torch.float64), mod)
    else:
        b = mod.bias
    return b.detach().to(torch.float64) if b is not None else torch.zeros(channels, dtype=torch.float64)


def _conv_attrs(name: str, mod: nn.Conv2d) -> dict:
    if mod.padding_mode != "zeros":
        raise ValueError(f"layer {name!r}: padding_mode={mod.padding_mode!r} is not supported (zeros only)")
    if isinstance(mod.padding, str):
        raise ValueError(f"layer {name!r}: string padding {mod.padding!r} is not supported")
    return {"stride": _pair(mod.stride), "padding": _pair(mod.padding), "dilation": _pair(mod.dilation),
            "groups": int(mod.groups)}


class _Compiler(Emitter):
    """Visits the fx nodes in order; ``vals`` maps each node to its :class:`~qcnn.integer.values.Value`."""

    def __init__(self, gm: fx.GraphModule, bias_mode: str = "output", requant: str = "int64"):
        super().__init__(bias_mode, requant)
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.vals: dict[str, Value] = {}
        self.pieces: dict[str, list[Value]] = {}  # chunk / split nodes -> their pieces (picked by getitem)
        self.input_name = None
        self.input_shape = None
        self.outputs: list[str] = []

    def compile(self) -> IntegerModel:
        for node in self.gm.graph.nodes:
            self.visit(node)
        meta = {"layers": sum(op.kind in ("conv", "linear") for op in self.ops), "bias_mode": self.bias_mode,
                "requant": self.scheme.name}
        return IntegerModel(self.ops, self.input_name, self.outputs, self.points, self.input_shape, meta)

    def arg(self, node: fx.Node, i: int = 0) -> Value:
        a = node.args[i]
        if not isinstance(a, fx.Node) or a.name not in self.vals:
            raise ValueError(f"node {node.name!r}: argument {i} is not a tensor value the engine knows")
        return self.vals[a.name]

    def call_kwargs(self, node: fx.Node) -> dict:
        """All arguments of a call_function node by name, defaults included (torch.fx normalisation)."""
        try:
            args = node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)
        except RuntimeError:  # an overloaded operator whose schema the arguments match ambiguously
            args = None
        if args is None:
            raise ValueError(f"node {node.name!r}: the arguments of {_target_name(node.target)} cannot be matched "
                             "to its signature")
        return dict(args.kwargs)

    def visit(self, node: fx.Node) -> None:
        handler = _NODE_HANDLERS.get(node.op)
        if node.op in ("call_function", "call_method") and "tensor_meta" not in node.meta and not any(
                a.name in self.vals or a.name in self.pieces for a in node.all_input_nodes):
            return  # shape arithmetic (x.size(), its items, their products): the engine reads shapes from ShapeProp
        if handler is None and node.op == "get_attr":  # a parameter read by a function: a traced-through module
            owner = str(node.target).rpartition(".")[0]
            try:
                kind = type(self.gm.get_submodule(owner)).__name__ if owner else type(self.gm).__name__
            except AttributeError:
                kind = "module"
            users = sorted({_target_name(u.target) for u in node.users})
            kind = "" if kind in ("Module", "GraphModule") else f"{kind}: "  # fx keeps traced-through modules bare
            raise ValueError(f"{owner or 'the model'} ({kind}{', '.join(users)} on its {node.target!r}) is not "
                             "supported by the integer engine; qcnn export --onnx-form torch exports it with float "
                             "ops between the quantized ones")
        if handler is None:
            raise ValueError(f"node {node.name!r} ({node.op} {node.target}) is not supported by the integer engine")
        res = handler(self, node)
        if res is not None:
            self.vals[node.name] = res

    # -- node kinds --------------------------------------------------------------------------------------
    def placeholder(self, node: fx.Node) -> Value:
        if self.input_name is not None:
            raise ValueError(f"the integer engine supports one network input; found a second: {node.name!r}")
        self.input_name = node.name
        self.input_shape = node_shape(node)[1:]
        return Value("f", node.name, shape=node_shape(node))

    def output(self, node: fx.Node) -> None:
        outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
        for o in outs:
            self.outputs.append(self.dequantize(self.vals[o.name]))

    def call_module(self, node: fx.Node) -> Value:
        mod = self.modules[node.target]
        if hasattr(mod, "to_qconv"):  # QConvBn2d (FQN training): compile its folded QConv2d
            mod = mod.to_qconv()
        for types, handler in _MODULE_HANDLERS:
            if isinstance(mod, types):
                return handler(self, node, mod)
        raise _unsupported_module(node, mod)

    def call_function(self, node: fx.Node) -> Value:
        handler = _FUNCTION_HANDLERS.get(node.target) or _optional_handler(node.target)
        if handler is not None:
            return handler(self, node)
        if node.target in _FLOAT_ADDS:
            raise ValueError(f"add {node.name!r} is not quantized; quantize with recipe quantize_adds=True")
        if node.target in _UNWRAPPED:
            raise _unwrapped(node, _UNWRAPPED[node.target])
        raise ValueError(f"function {_target_name(node.target)!r} (node {node.name!r}) is not supported by the "
                         "integer engine")

    def call_method(self, node: fx.Node) -> Value | None:
        tgt = node.target
        if tgt in ("size", "dim", "numel"):  # shape queries: their arithmetic is skipped (visit)
            return None
        if tgt in ("relu", "relu_"):
            return self.clamp(self.arg(node), 0.0, None)
        if tgt in _RESHAPE_METHODS:
            return self.reshape(self.arg(node), node.name, node_shape(node))
        if tgt == "mean":
            return self.mean(node)
        if tgt in ("permute", "transpose"):
            return self.fn_permute(node)
        if tgt in ("chunk", "split"):
            return self.fn_split(node)
        if tgt in ("sigmoid", "tanh", "mul"):
            raise _unwrapped(node, tgt)
        raise ValueError(f"method {tgt!r} (node {node.name!r}) is not supported by the integer engine")

    # -- layers ------------------------------------------------------------------------------------------
    def linear_layer(self, node: fx.Node, mod: nn.Module) -> Value:
        name = node.target
        g_in = ActGrid.from_quantizer(mod.input_quant, f"layer {name!r} input")
        x = self.to_grid(self.arg(node), g_in, f"{name}.input_quant")
        w = _weights(name, mod)
        bias = _real_bias(mod, w.codes.shape[0])
        is_conv = isinstance(mod, nn.Conv2d)
        conv = _conv_attrs(name, mod) if is_conv else {}
        attrs = {"layer": name, "input_zero_point": g_in.zero_point, "input_scale": g_in.scale,
                 "weight_bits": w.grid.bits, "weight_qmin": w.grid.qmin, "weight_qmax": w.grid.qmax, **conv}
        bound = w.fan_in * g_in.centred_bound * w.bound
        if bound >= 2**53:
            raise ValueError(f"layer {name!r}: accumulator bound {bound:.3g} exceeds 2^53")
        out = self.fresh(name)
        op = self.emit(Op("conv" if is_conv else "linear", [x], out, attrs,
                          {"weight": w.codes.to(w.dtype), "weight_zero_point": w.zero_point,
                           "weight_scale": w.scale.clone()}))
        layer = Layer(op, g_in.scale * w.scale, bias, bound)
        val = Value("a", out, producer=layer, shape=node_shape(node))
        self._finalize(layer, val)
        oq = mod.out_quant
        if oq is not None and not isinstance(oq, GradientQuantizer):
            g_out = ActGrid.from_quantizer(oq, f"layer {name!r} output")
            return codes(self.to_grid(val, g_out, f"{name}.out_quant"), g_out, val.shape)
        return val

    def _finalize(self, layer: Layer, val: Value) -> None:
        """(Re)compute sign, int bias and the accumulator scale of a conv/linear from its real scale/bias."""
        op, s, b = layer.op, layer.scale, layer.bias
        if bool((s == 0).any()):
            raise ValueError(f"layer {op.attrs['layer']!r}: a channel has zero scale (BatchNorm gamma = 0)")
        s_abs = s.abs()
        bias_int = torch.round(b / s_abs).to(torch.int64)
        op.tensors["sign"] = torch.where(s < 0, -1, 1).to(torch.int8)
        op.tensors["acc_scale"] = s_abs
        op.tensors["bias_real"] = b.clone()
        val.scale = s_abs.reshape([1, -1] + [1] * (len(val.shape) - 2))
        if self.bias_mode == "accumulator":
            if bool((bias_int.abs() >= 2**31).any()):
                raise ValueError(f"layer {op.attrs['layer']!r}: bias does not fit int32 (|b / (s_x s_w)| >= 2^31)")
            op.tensors["bias"] = bias_int.to(torch.int32)
            val.bound = layer.bound + float(bias_int.abs().max())
            val.offset = None
        else:  # the bias stays exact: added in the output units of each consumer (see requant/add)
            op.tensors["bias"] = torch.zeros_like(bias_int, dtype=torch.int32)
            val.bound = layer.bound
            val.offset = b.reshape(val.scale.shape).clone()

    def batchnorm(self, node: fx.Node, bn: nn.Module) -> Value:
        """BatchNorm (frozen statistics) folded into the conv before it, or a per-channel affine map of codes
        (a BatchNorm after a concatenation, as DenseNet's)."""
        v = self.arg(node)
        if bn.running_var is None:
            raise ValueError(f"BatchNorm {node.target!r} has no running statistics")
        sigma = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
        f = gamma / sigma
        if v.kind == "q":
            return self.affine(node.target, v, f, beta - bn.running_mean.double() * f, node_shape(node))
        layer, src = v.producer, node.args[0]
        if v.kind != "a" or layer is None or len(src.users) != 1 or v.lo is not None or v.hi is not None:
            raise ValueError(f"BatchNorm {node.target!r} does not directly follow a conv/linear layer or codes (it "
                             f"follows {src.name!r}); fold it into the conv first, or quantize its input")
        layer.scale, layer.bias = layer.scale * f, (layer.bias - bn.running_mean.double()) * f + beta
        layer.op.attrs.setdefault("folded_batchnorm", node.target)
        self._finalize(layer, v)
        return v

    def residual_add(self, node: fx.Node, mod: QAdd) -> Value:
        a, b = self.arg(node, 0), self.arg(node, 1)
        if mod.out_quant is None:
            raise ValueError(f"residual add {node.target!r} has no output quantizer")
        g = ActGrid.from_quantizer(mod.out_quant, f"add {node.target!r} output")
        res = self.add(node.target, g, [a, b], node_shape(node))
        self.points[f"{node.target}.out_quant"] = res.name
        return res

    def _out_grid(self, mod: nn.Module, what: str) -> ActGrid:
        if getattr(mod, "out_quant", None) is None:
            raise ValueError(f"{what} has no output quantizer (a method without activation quantizers?)")
        return ActGrid.from_quantizer(mod.out_quant, f"{what} output")

    def concatenation(self, node: fx.Node, mod: QCat) -> Value:
        g = self._out_grid(mod, f"concatenation {node.target!r}")
        shape = node_shape(node)
        vals = [self.arg(node, i) for i in range(len(node.args))]
        return self.concat(node.target, g, vals, mod.dim % len(shape), shape)

    def product(self, node: fx.Node, mod: QMul) -> Value:
        g = self._out_grid(mod, f"product {node.target!r}")
        return self.mul(node.target, g, [self.arg(node, 0), self.arg(node, 1)], node_shape(node))

    def activation(self, node: fx.Node, mod: QAct) -> Value:
        """``QAct``: input codes (its input quantizer, or codes already), then a lookup table to the output grid
        (an identity ``QAct`` is a requantization to its grid)."""
        name = node.target
        v = self.arg(node)
        if mod.input_quant is not None:
            g_in = ActGrid.from_quantizer(mod.input_quant, f"activation {name!r} input")
            v = codes(self.to_grid(v, g_in, f"{name}.input_quant"), g_in, v.shape)
        g = self._out_grid(mod, f"activation {name!r}")
        if mod.act is None:
            return codes(self.to_grid(v, g, f"{name}.out_quant"), g, v.shape)
        fn = type(mod.act).__name__
        if v.kind != "q":
            raise ValueError(f"activation {name!r} ({fn}): its input is not quantized; the lookup table maps input "
                             "codes to output codes (give the QAct an input quantizer: qcnn.quantize does)")
        return self.lut(name, v, g, lut_table(mod.act, v.grid, g, f"activation {name!r}"), fn)

    # -- pooling -----------------------------------------------------------------------------------------
    def maxpool(self, node: fx.Node, v: Value, k, s, p, d, ceil) -> Value:
        s = k if s is None or s == [] else s
        attrs = {"kernel": _pair(k), "stride": _pair(s), "padding": _pair(p), "dilation": _pair(d)}
        if ceil:
            attrs["ceil_mode"] = True
        op = Op("maxpool", [v.name], self.fresh(node.name), attrs)
        if v.kind == "f":
            raise ValueError(f"max pool {node.name!r} acts on the float input before any quantizer")
        if v.kind == "a" and not uniform_in_windows(v):
            raise ValueError(f"max pool {node.name!r}: its input's scale varies over the pooled dimensions (a "
                             "permuted accumulator); pool before the permute, or quantize the tensor first")
        self.emit(op)
        return v.copy(name=op.output, producer=None, shape=node_shape(node))

    def avgpool(self, node: fx.Node, v: Value, k, s, p, ceil, count_include_pad, divisor) -> Value:
        k, p = _pair(k), _pair(p)
        s = k if s is None or s == [] else _pair(s)
        if ceil:
            raise ValueError(f"average pool {node.name!r}: ceil_mode=True is not supported")
        if (p[0] or p[1]) and not count_include_pad:
            raise ValueError(f"average pool {node.name!r}: count_include_pad=False with padding is not supported")
        count = divisor if divisor else k[0] * k[1]
        return self.sumpool(v, node.name, node_shape(node), k, s, p, count, False)

    def adaptive(self, node: fx.Node, v: Value) -> Value:
        h, w = v.shape[-2:]
        oh, ow = node_shape(node)[-2:]
        if h % oh or w % ow:
            raise ValueError(f"adaptive average pool {node.name!r}: input {h}x{w} is not a multiple of {oh}x{ow}")
        if (oh, ow) == (1, 1):
            return self.sumpool(v, node.name, node_shape(node), [h, w], [h, w], [0, 0], h * w, True)
        k = [h // oh, w // ow]
        return self.sumpool(v, node.name, node_shape(node), k, k, [0, 0], k[0] * k[1], False)

    def mean(self, node: fx.Node) -> Value:
        v = self.arg(node)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = tuple(sorted(d % len(v.shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))))
        if dims != (2, 3):
            raise ValueError(f"mean {node.name!r} over dims {dims} is not supported (spatial (2, 3) only)")
        h, w = v.shape[-2:]
        res = self.sumpool(v, node.name, node_shape(node), [h, w], [h, w], [0, 0], h * w, True)
        res.shape = tuple(v.shape[:2]) + (1, 1)
        if not node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]):
            return self.reshape(res, node.name, node_shape(node))
        return res

    # -- functions ---------------------------------------------------------------------------------------
    def fn_maxpool(self, node: fx.Node) -> Value:
        kw = self.call_kwargs(node)  # (fx traces return_indices=True to max_pool2d_with_indices: refused)
        return self.maxpool(node, self.arg(node), kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                            kw.get("dilation", 1), kw.get("ceil_mode", False))

    def fn_avgpool(self, node: fx.Node) -> Value:
        kw = self.call_kwargs(node)
        return self.avgpool(node, self.arg(node), kw["kernel_size"], kw.get("stride"), kw.get("padding", 0),
                            kw.get("ceil_mode", False), kw.get("count_include_pad", True), kw.get("divisor_override"))

    def fn_hardtanh(self, node: fx.Node) -> Value:
        kw = self.call_kwargs(node)
        lo, hi = kw.get("min_val", -1.0), kw.get("max_val", 1.0)
        if lo < 0:
            raise ValueError(f"hardtanh {node.name!r} with min_val={lo} < 0 is not supported")
        return self.clamp(self.arg(node), float(lo), float(hi))

    def fn_getitem(self, node: fx.Node) -> Value:
        src = node.args[0]
        if isinstance(src, fx.Node) and src.name in self.pieces:
            return self.pieces[src.name][node.args[1]]
        v = self.arg(node)
        idx = index_to_json(node.args[1])
        first = idx[0] if idx else [None, None, None]
        if first == "..." or not (isinstance(first, list) and first == [None, None, None]):
            raise ValueError(f"slicing {node.name!r} must keep the batch dimension (x[:, ...])")
        op = Op("getitem", [v.name], self.fresh(node.name), {"index": idx})
        return self.passthrough(v, op, node_shape(node), lambda s: s[index_from_json(idx)])

    def fn_split(self, node: fx.Node) -> None:
        """``chunk`` / ``split`` (method or function): one slicing op per piece, which ``getitem`` picks."""
        v = self.arg(node)
        n = node.args[1] if len(node.args) > 1 else next(val for k, val in node.kwargs.items() if k != "dim")
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(v.shape)
        if dim == 0:
            raise ValueError(f"{node.target} {node.name!r} splits the batch dimension")
        size = v.shape[dim]
        if node.target in ("chunk", torch.chunk):
            n = -(-size // int(n))
        sizes = [int(n)] * (size // int(n)) + ([size % int(n)] if size % int(n) else []) if isinstance(n, int) \
            else [int(t) for t in n]
        self.pieces[node.name], start = [], 0
        for k in sizes:
            idx = [[None, None, None]] * dim + [[start, start + k, None]]
            shape = v.shape[:dim] + (k,) + v.shape[dim + 1:]
            op = Op("getitem", [v.name], self.fresh(node.name), {"index": idx})
            sel = index_from_json(idx)
            self.pieces[node.name].append(self.passthrough(v, op, shape, lambda s, i=sel: s[i]))
            start += k
        return None

    def fn_permute(self, node: fx.Node) -> Value:
        """``permute`` / ``transpose`` (method or function): codes move, nothing is computed."""
        v = self.arg(node)
        nd = len(v.shape)
        rest = [a for a in node.args[1:]] or list(node.kwargs.values())
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (int(a) % nd for a in rest[:2])
            dims = list(range(nd))
            dims[d0], dims[d1] = d1, d0
        else:
            dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)
            dims = [int(d) % nd for d in dims]
        return self.permute(v, node.name, dims, node_shape(node))

    def fn_pad(self, node: fx.Node) -> Value:
        v = self.arg(node)
        kw = self.call_kwargs(node)
        pad = [int(t) for t in kw["pad"]]
        if kw.get("mode", "constant") != "constant" or kw.get("value") not in (None, 0, 0.0):
            raise ValueError(f"pad {node.name!r}: only constant zero padding is supported")
        v = self.materialize(v, offset=True) if v.offset is not None else v
        fill = v.grid.zero_point if v.kind == "q" else 0
        op = Op("pad", [v.name], self.fresh(node.name), {"pad": pad, "value": fill})
        return self.passthrough(v, op, node_shape(node), lambda s: F.pad(s, pad, value=1.0))


def _target_name(target) -> str:
    return getattr(target, "__name__", str(target))


def _unsupported_module(node: fx.Node, mod: nn.Module) -> ValueError:
    return ValueError(f"module {node.target!r} ({type(mod).__name__}) is not supported by the integer engine")


def _stochastic_depth(c: _Compiler, node: fx.Node) -> Value:
    kw = {**dict(zip(("input", "p", "mode", "training"), node.args)), **node.kwargs}
    if kw.get("training", True) and kw.get("p", 0.0) > 0:
        raise ValueError(f"stochastic depth {node.name!r} was traced in training mode (it drops samples at random); "
                         "quantize the model in eval mode")
    return c.arg(node)


def _attribute(c: _Compiler, node: fx.Node) -> None:
    if node.args[1] not in ("shape", "ndim", "dtype", "device"):
        raise ValueError(f"attribute {node.args[1]!r} (node {node.name!r}) is not supported by the integer engine")
    return None  # a shape query, like x.size()


def _optional_handler(target) -> Handler | None:
    """Handlers of functions of optional packages, found without importing them (a graph that calls one holds
    it, so the package is loaded): torchvision's ``stochastic_depth`` (EfficientNet), the identity in eval."""
    ops = sys.modules.get("torchvision.ops")
    if ops is not None and target is getattr(ops, "stochastic_depth", None):
        return _stochastic_depth
    return None


def _unwrapped(node: fx.Node, what: str) -> ValueError:
    return ValueError(f"{what} {node.name!r} ({_target_name(node.target)}) is not quantized: integer inference runs "
                      f"it on codes inside the module qcnn.quantize puts there (recipe quantize_adds=True: QCat, QMul, "
                      "QAct)")


@torch.no_grad()
def lut_table(act: nn.Module, g_in: ActGrid, g_out: ActGrid, where: str) -> Tensor:
    """Output code of every input code of ``act``, computed as the float64 simulation does: dequantize
    ``(q - z) s`` (float64, fl32 scale), apply ``act`` in float64, quantize ``round(y fl32(1/s_out)) + z_out``."""
    if g_in.qmax - g_in.qmin >= 2**16:
        raise ValueError(f"{where}: a {g_in.bits}-bit input grid is too wide for a lookup table (at most 16 bits)")
    q = torch.arange(g_in.qmin, g_in.qmax + 1, dtype=torch.float64)
    y = act((q - g_in.zero_point) * g_in.scale).to(torch.float64)
    codes = torch.round(y * g_out.inv_scale) + g_out.zero_point
    return torch.clamp(codes, g_out.qmin, g_out.qmax).to(torch.int64)


def _bare_activation(c: _Compiler, node: fx.Node, mod: nn.Module) -> Value:
    raise _unwrapped(node, type(mod).__name__)


def _not_quantized(c: _Compiler, node: fx.Node, mod: nn.Module) -> Value:
    raise ValueError(f"layer {node.target!r} ({type(mod).__name__}) is not quantized; integer inference needs "
                     "every layer quantized (recipe first_last '8bit' or 'same', no skip overrides)")


def _channel_clamp(c: _Compiler, node: fx.Node, mod: nn.Module) -> Value:
    raise ValueError(f"module {node.target!r} (ChannelClamp: a ReLU6 rescaled per channel by cross-layer "
                     "equalization) has no integer kernel yet; for integer inference equalize with "
                     "ptq.equalize_relu6 'relu' or 'skip' (qcnn ptq: --equalize-relu6)")


def _hardtanh_module(c: _Compiler, node: fx.Node, mod: nn.Hardtanh) -> Value:
    if mod.min_val < 0:
        raise _unsupported_module(node, mod)
    return c.clamp(c.arg(node), float(mod.min_val), float(mod.max_val))


Handler = Callable[..., Value | None]
_NODE_HANDLERS: dict[str, Handler] = {
    "placeholder": _Compiler.placeholder,
    "output": _Compiler.output,
    "call_module": _Compiler.call_module,
    "call_function": _Compiler.call_function,
    "call_method": _Compiler.call_method,
}
#: (module types, handler(compiler, node, module)), first match wins
_MODULE_HANDLERS: list[tuple[type | tuple[type, ...], Handler]] = [
    ((QConv2d, QLinear), _Compiler.linear_layer),
    ((nn.BatchNorm2d, nn.BatchNorm1d), _Compiler.batchnorm),
    ((nn.ReLU, nn.ReLU6), lambda c, n, m: c.clamp(c.arg(n), 0.0, 6.0 if isinstance(m, nn.ReLU6) else None)),
    (nn.Hardtanh, _hardtanh_module),
    (ChannelClamp, _channel_clamp),
    (_IDENTITY_MODULES, lambda c, n, m: c.arg(n)),
    (nn.Flatten, lambda c, n, m: c.reshape(c.arg(n), n.name, node_shape(n))),
    (nn.MaxPool2d, lambda c, n, m: c.maxpool(n, c.arg(n), m.kernel_size, m.stride, m.padding, m.dilation,
                                             m.ceil_mode)),
    (nn.AvgPool2d, lambda c, n, m: c.avgpool(n, c.arg(n), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                             m.count_include_pad, m.divisor_override)),
    (nn.AdaptiveAvgPool2d, lambda c, n, m: c.adaptive(n, c.arg(n))),
    (QAdd, _Compiler.residual_add),
    (QCat, _Compiler.concatenation),
    (QMul, _Compiler.product),
    (QAct, _Compiler.activation),
    (_ACTIVATION_MODULES, _bare_activation),
    ((nn.Conv2d, nn.Linear), _not_quantized),
]


def _relu(c: _Compiler, n: fx.Node) -> Value:
    return c.clamp(c.arg(n), 0.0, None)


#: call_function target -> handler(compiler, node)
_FUNCTION_HANDLERS: dict[Callable, Handler] = {
    F.relu: _relu,
    torch.relu: _relu,
    torch.relu_: _relu,
    F.relu6: lambda c, n: c.clamp(c.arg(n), 0.0, 6.0),
    F.hardtanh: _Compiler.fn_hardtanh,
    torch.flatten: lambda c, n: c.reshape(c.arg(n), n.name, node_shape(n)),
    F.dropout: lambda c, n: c.arg(n),
    F.adaptive_avg_pool2d: lambda c, n: c.adaptive(n, c.arg(n)),
    F.max_pool2d: _Compiler.fn_maxpool,
    torch.max_pool2d: _Compiler.fn_maxpool,
    F.avg_pool2d: _Compiler.fn_avgpool,
    torch._C._nn.avg_pool2d: _Compiler.fn_avgpool,
    operator.getitem: _Compiler.fn_getitem,
    F.pad: _Compiler.fn_pad,
    torch.permute: _Compiler.fn_permute,
    torch.transpose: _Compiler.fn_permute,
    torch.mean: _Compiler.mean,
    torch.chunk: _Compiler.fn_split,
    getattr: _attribute,
    torch.split: _Compiler.fn_split,
}


@torch.no_grad()
def to_integer(model: nn.Module, example_input: Tensor, bias_mode: str = "output",
               requant: str = "int64") -> IntegerModel:
    """Compile a quantized ``torch.fx`` model into an :class:`IntegerModel` for inputs shaped like
    ``example_input`` (any batch size). Unsupported nodes are named in a ValueError.

    ``bias_mode``: ``accumulator`` adds ``round(b / (s_x s_w))`` (int32) to the accumulator as in Jacob et al.
    (and as ONNX Runtime's QLinearConv does); ``output`` (default) keeps the bias exact by adding it in output
    units, with the fractional bits of the requantization, before its one rounding.

    ``requant``: ``int64`` (default) rounds once, ``y = RDBPOT(sum_i x_i K_i + offset, n)`` with int32
    multipliers ``K_i`` and int64 products (:func:`~qcnn.integer.requant.wide_multipliers`: 31-bit multipliers,
    the residual add's operands summed before the rounding); ``int32`` is gemmlowp's ``MBQM`` with int32
    intermediates (``F <= 16`` extra fractional bits, two roundings in a residual add), bit-exact with
    TFLite's int8 kernels. Both round where the simulation does; ``int64`` keeps ~2^-31 instead of ~2^-16 of
    an LSB of intermediate error, which is what lets deep networks agree with the simulation end to end."""
    if not isinstance(model, fx.GraphModule):
        raise ValueError(f"{type(model).__name__} is not a torch.fx GraphModule: integer inference needs the graph "
                         "produced by qcnn.quantize (models torch.fx cannot trace are not supported)")
    was_training = model.training
    model.eval()
    try:
        x = example_input[:1].to(next(model.parameters()).device)
        ShapeProp(model).propagate(x)
        im = _Compiler(model, bias_mode, requant).compile()
    finally:
        model.train(was_training)
    return im


__all__ = ["node_shape", "to_integer"]

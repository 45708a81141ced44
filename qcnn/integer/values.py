"""Compile-time values and the ops that move them between representations (the compiler's arithmetic).

A :class:`Value` is where a tensor of the network lives while it is compiled: the float network input
(``f``), integer codes on an activation grid (``q``), or an integer accumulator whose real value is
``scale * acc + offset`` (``a``), with a pending ReLU/ReLU6 clamp that the next requantization folds into
its bounds. :class:`Emitter` appends the integer ops that turn one into another (quantize, requantize,
rescale, clamp, pool, move) to its op list. It knows nothing of torch.fx: :mod:`qcnn.integer.compiler`
maps graph nodes onto it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qcnn.integer.ir import ActGrid, Op
from qcnn.integer.schemes import get_scheme

#: ``bias_mode`` values of :func:`~qcnn.integer.compiler.to_integer`
BIAS_MODES = ("output", "accumulator")


@dataclass
class Layer:
    """A conv / linear op while it is compiled: the real per-channel scale ``s_x s_w`` and bias of its
    accumulator before they are made integers (a following BatchNorm folds into them), and the bound of
    ``|sum (x - z_x)(w - z_w)|``."""

    op: Op
    scale: Tensor  # float64 (C,)
    bias: Tensor  # float64 (C,)
    bound: float


@dataclass
class Value:
    """Compile-time description of a value: ``f`` float (network input), ``q`` codes on ``grid``,
    ``a`` integer accumulator whose real value is ``scale * acc`` (``scale`` broadcasts over the value)."""

    kind: str
    name: str
    grid: ActGrid | None = None
    scale: Tensor | None = None  # float64, shape (1, ...) broadcastable
    lo: float | None = None  # pending real clamp (ReLU, ReLU6) not yet applied
    hi: float | None = None
    bound: float = 0.0  # max |integer value| (centred codes for q)
    producer: Layer | None = None  # the conv / linear whose accumulator this is, unchanged
    shape: tuple[int, ...] = ()
    offset: Tensor | None = None  # float64 real offset: value = scale * acc + offset (bias kept exact)

    def copy(self, **kw) -> Value:
        return dataclasses.replace(self, **kw)


def _compact(t: Tensor) -> Tensor:
    """``t`` reduced to size 1 along every dimension it is constant along (it broadcasts to the same values)."""
    for d in range(1, t.dim()):
        if t.shape[d] > 1 and bool((t == t.narrow(d, 0, 1)).all()):
            t = t.narrow(d, 0, 1)
    return t.contiguous()


def uniform_in_windows(v: Value) -> bool:
    """Whether an accumulator's scale and offset are the same at every position of the last two dimensions (as
    pooling windows need: they compare or add values of one scale)."""
    return all(t is None or t.dim() < 2 or (t.shape[-1] == 1 and t.shape[-2] == 1) for t in (v.scale, v.offset))


def codes(name: str, g: ActGrid, shape) -> Value:
    """The value of codes ``name`` on grid ``g``."""
    return Value("q", name, grid=g, bound=g.centred_bound, shape=tuple(shape))


class Emitter:
    """Appends integer ops to ``ops``; ``points`` maps quantizer points to the values holding their codes.

    ``requant`` names the requantization scheme (:mod:`qcnn.integer.schemes`): it is chosen here, once, and
    every requantization goes through ``self.scheme``."""

    def __init__(self, bias_mode: str, requant: str):
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode={bias_mode!r} must be 'output' or 'accumulator'")
        self.bias_mode = bias_mode
        self.scheme = get_scheme(requant)
        self.ops: list[Op] = []
        self.points: dict[str, str] = {}
        self._grid_cache: dict[tuple, str] = {}
        self._n = 0

    @property
    def exact_bias(self) -> bool:
        """Biases stay exact, added in the output units of each requantization (``bias_mode="output"``)."""
        return self.bias_mode == "output"

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}#{self._n}"

    def emit(self, op: Op) -> Op:
        self.ops.append(op)
        return op

    def materialize(self, v: Value, offset: bool = False, headroom: int = 1) -> Value:
        """Apply a pending ReLU/ReLU6 clamp to an accumulator (before non-monotone operations); with a clamp
        or ``offset=True`` the exact real offset is first rounded into the accumulator (``acc + round(o/S)``)."""
        clamps = v.lo is not None or v.hi is not None
        if v.kind != "a" or not (clamps or (offset and v.offset is not None)):
            return v
        tensors = {}
        bound = v.bound
        scale = v.scale
        if v.offset is not None:
            # keep k extra fractional bits so the rounded offset (and a ReLU at 0) stay exact to 2^-k acc units
            off = v.offset / v.scale
            top = math.log2(max((bound + float(off.abs().max())) * headroom, 1.0))
            k = max(0, min(self.scheme.offset_frac_cap, int(math.floor(30 - top))))
            if k:
                tensors["pre_shift"] = torch.tensor(k)
                scale = v.scale / 2.0**k
                bound *= 2.0**k
            tensors["add"] = torch.round(v.offset / scale).to(torch.int64)
            bound += float(tensors["add"].abs().max())
        if v.lo is not None:
            tensors["lo"] = torch.round(torch.as_tensor(v.lo, dtype=torch.float64) / scale).to(torch.int64)
        if v.hi is not None:
            tensors["hi"] = torch.round(torch.as_tensor(v.hi, dtype=torch.float64) / scale).to(torch.int64)
        out = self.fresh(v.name)
        self.emit(Op("clamp", [v.name], out, {"lo_real": v.lo, "hi_real": v.hi}, tensors))
        return Value("a", out, scale=scale, bound=bound, shape=v.shape)

    def to_grid(self, v: Value, g: ActGrid, point: str | None) -> str:
        """Name of the codes of ``v`` on grid ``g`` (emitting quantize / requant / rescale as needed)."""
        key = (v.name, v.lo, v.hi, g)
        if v.kind == "q" and v.grid == g:
            name = v.name
        elif key in self._grid_cache:
            name = self._grid_cache[key]
        else:
            name = self.fresh(point or v.name)
            lo, hi = g.qmin, g.qmax
            if v.lo is not None:
                lo = max(lo, g.code(v.lo))
            if v.hi is not None:
                hi = min(hi, g.code(v.hi))
            if v.kind == "f":
                self.emit(Op("quantize", [v.name], name,
                             {"scale": g.scale, "inv_scale": g.inv_scale, "zero_point": g.zero_point,
                              "qmin": g.qmin, "qmax": g.qmax, "lo_real": v.lo, "hi_real": v.hi, "grid": g.to_json()}))
            else:
                self.emit(self._requant(v, g, name, lo, hi))
            self._grid_cache[key] = name
        if point is not None:
            self.points[point] = name
        return name

    def _requant(self, v: Value, g: ActGrid, name: str, lo: int, hi: int) -> Op:
        """``requant`` of an accumulator, or of codes on another grid (a rescale), to codes ``name`` on ``g``."""
        if v.kind == "q":
            m = torch.tensor(v.grid.scale * g.inv_scale, dtype=torch.float64)
            extra = {"input_zero_point": v.grid.zero_point, "input_grid": v.grid.to_json()}
        else:
            m = v.scale * g.inv_scale
            extra = {}
            self.scheme.check_accumulator(v.name, v.bound)
        off = v.offset * g.inv_scale if v.offset is not None and self.exact_bias else None
        attrs, tensors = self.scheme.plan_requant(m, v.bound, off, self.exact_bias)
        return Op("requant", [v.name], name,
                  {"zero_point": g.zero_point, "lo": lo, "hi": hi, "grid": g.to_json(), **extra, **attrs},
                  {"real_multiplier": m.to(torch.float64), **tensors})

    def clamp(self, v: Value, lo: float | None, hi: float | None) -> Value:
        """``v`` clamped to the real range [lo, hi] (a clamp op on codes, a pending clamp on accumulators)."""
        if v.kind == "q":
            g = v.grid
            lo_c = torch.tensor(max(g.qmin, g.code(lo)) if lo is not None else g.qmin)
            hi_c = torch.tensor(min(g.qmax, g.code(hi)) if hi is not None else g.qmax)
            out = self.fresh(v.name)
            self.emit(Op("clamp", [v.name], out, {"lo_real": lo, "hi_real": hi}, {"lo": lo_c, "hi": hi_c}))
            return codes(out, g, v.shape)
        nlo = lo if v.lo is None else (v.lo if lo is None else max(v.lo, lo))
        nhi = hi if v.hi is None else (v.hi if hi is None else min(v.hi, hi))
        return v.copy(lo=nlo, hi=nhi)

    def sumpool(self, v: Value, name: str, shape, kernel, stride, padding, count: int, glob: bool) -> Value:
        """Window sums of ``v`` (an accumulator of scale ``s / count``): average pools (``name``: the node)."""
        v = self.materialize(v, offset=bool(padding[0] or padding[1]), headroom=count)
        if v.kind == "f":
            raise ValueError(f"pooling node {name!r} acts on the float input before any quantizer")
        if v.kind == "a" and not uniform_in_windows(v):
            raise ValueError(f"pooling node {name!r}: its input's scale varies over the pooled dimensions (a "
                             "permuted accumulator); pool before the permute, or quantize the tensor first")
        attrs = {"kernel": kernel, "stride": stride, "padding": padding, "global": glob}
        if v.kind == "q":
            attrs["input_zero_point"] = v.grid.zero_point
            scale = torch.tensor([v.grid.scale], dtype=torch.float64).reshape(1, 1, 1, 1) / count
        else:
            scale = v.scale / count
        out = self.fresh(name)
        self.emit(Op("sumpool", [v.name], out, attrs))
        return Value("a", out, scale=scale, bound=v.bound * count, shape=tuple(shape), offset=v.offset)

    def passthrough(self, v: Value, op: Op, shape, scale_fn=None) -> Value:
        """Emit ``op``, which moves the elements of ``v`` (``scale_fn`` moves its per-element scale alike; the
        result is kept at size 1 along every dimension where it is constant, e.g. per channel again after a
        permute and its inverse)."""
        self.emit(op)
        scale, offset = v.scale, v.offset
        full = (1,) + tuple(v.shape[1:])
        if v.kind == "a" and scale_fn is not None:
            scale = _compact(scale_fn(scale.expand(full).contiguous()))
            if offset is not None:
                offset = _compact(scale_fn(offset.expand(full).contiguous()))
        return v.copy(name=op.output, scale=scale, offset=offset, producer=None, shape=tuple(shape))

    def reshape(self, v: Value, name: str, shape) -> Value:
        """``v`` reshaped to ``shape`` (batch dimension first)."""
        dims = list(shape[1:])
        op = Op("reshape", [v.name], self.fresh(name), {"shape": dims})
        return self.passthrough(v, op, shape, lambda s: s.reshape([1] + dims))

    def add(self, name: str, g: ActGrid, operands: list[Value], shape) -> Value:
        """Residual add ``name`` of ``operands``, requantized to codes on ``g``."""
        names, zps, terms = [], [], []
        offset = None
        for v in operands:
            v = self.materialize(v)
            if v.kind == "a" and v.offset is not None:
                o = v.offset * g.inv_scale
                offset = o if offset is None else offset + o
            if v.kind == "f":
                raise ValueError(f"add {name!r} consumes the float network input")
            names.append(v.name)
            if v.kind == "q":
                zps.append(v.grid.zero_point)
                terms.append((torch.tensor(v.grid.scale * g.inv_scale, dtype=torch.float64), v.bound))
            else:
                zps.append(0)
                terms.append((v.scale * g.inv_scale, v.bound))
        attrs = {"layer": name, "input_zero_points": zps, "zero_point": g.zero_point, "lo": g.qmin,
                 "hi": g.qmax, "grid": g.to_json()}
        extra, tensors = self.scheme.plan_add(terms, offset)
        out = self.fresh(name)
        self.emit(Op("add", names, out, {**attrs, **extra}, tensors))
        return codes(out, g, shape)

    def concat(self, name: str, g: ActGrid, operands: list[Value], dim: int, shape) -> Value:
        """Concatenation ``name`` along ``dim``: every operand requantized to codes on ``g``, then joined."""
        if dim == 0:
            raise ValueError(f"concatenation {name!r} along the batch dimension is not supported")
        names = [self.to_grid(v, g, None) for v in operands]
        out = self.fresh(name)
        self.emit(Op("concat", names, out, {"layer": name, "dim": dim, "grid": g.to_json()}))
        self.points[f"{name}.out_quant"] = out
        return codes(out, g, shape)

    def mul(self, name: str, g: ActGrid, operands: list[Value], shape) -> Value:
        """Elementwise product ``name`` of two code operands: ``(q_a - z_a)(q_b - z_b)``, an exact integer of
        scale ``s_a s_b``, requantized once to codes on ``g``."""
        for i, v in enumerate(operands):
            if v.kind != "q":
                what = "the float input" if v.kind == "f" else "an accumulator"
                raise ValueError(f"product {name!r}: operand {i} is {what}, not codes; the integer product needs "
                                 "both operands quantized (qcnn.quantize with quantize_adds=True puts a quantizer "
                                 "on such an operand)")
        a, b = operands
        out = self.fresh(name)
        self.emit(Op("mul", [a.name, b.name], out,
                     {"layer": name, "input_zero_points": [a.grid.zero_point, b.grid.zero_point]}))
        scale = torch.tensor(a.grid.scale * b.grid.scale, dtype=torch.float64).reshape([1] * len(shape))
        prod = Value("a", out, scale=scale, bound=a.bound * b.bound, shape=tuple(shape))
        return codes(self.to_grid(prod, g, f"{name}.out_quant"), g, shape)

    def lut(self, name: str, v: Value, g: ActGrid, table: Tensor, function: str) -> Value:
        """Elementwise function ``name`` of the codes ``v`` as a lookup table: ``out = table[q - qmin]``, codes on
        ``g`` (``table`` holds the output code of every input code, built at compile time)."""
        out = self.fresh(name)
        self.emit(Op("lut", [v.name], out, {"layer": name, "function": function, "input_qmin": v.grid.qmin,
                                             "input_grid": v.grid.to_json(), "grid": g.to_json()},
                     {"table": table.to(torch.int32)}))
        self.points[f"{name}.out_quant"] = out
        return codes(out, g, v.shape)

    def affine(self, name: str, v: Value, f: Tensor, b: Tensor, shape) -> Value:
        """Per-channel ``f v + b`` of the codes ``v`` (a BatchNorm after a concatenation, DenseNet): the integer
        ``sign (q - z)`` (``sign`` where ``f < 0``), an accumulator of scale ``s |f|`` and exact offset ``b``."""
        if bool((f == 0).any()):
            raise ValueError(f"BatchNorm {name!r}: a channel has zero scale (gamma = 0)")
        g = v.grid
        out = self.fresh(name)
        s = g.scale * f.abs()
        sign = torch.where(f < 0, -1, 1).to(torch.int8)
        self.emit(Op("affine", [v.name], out, {"layer": name, "input_zero_point": g.zero_point, "input_scale": g.scale},
                     {"sign": sign, "acc_scale": s.clone(), "bias_real": b.clone()}))
        bshape = [1, -1] + [1] * (len(shape) - 2)
        val = Value("a", out, scale=s.reshape(bshape), offset=b.reshape(bshape).clone(), bound=float(g.centred_bound),
                    shape=tuple(shape))
        return val if self.exact_bias else self.materialize(val, offset=True)

    def permute(self, v: Value, name: str, dims: list[int], shape) -> Value:
        """``v`` with its dimensions permuted (``dims[0] == 0``: the batch stays first)."""
        if dims[0] != 0:
            raise ValueError(f"permute {name!r} moves the batch dimension (dims {dims})")
        op = Op("permute", [v.name], self.fresh(name), {"dims": list(dims)})
        return self.passthrough(v, op, shape, lambda s: s.permute(dims))

    def dequantize(self, v: Value) -> str:
        """Name of the float value of ``v`` (a network output)."""
        v = self.materialize(v)
        name = self.fresh("output")
        if v.kind == "q":
            self.emit(Op("dequantize", [v.name], name, {"zero_point": v.grid.zero_point},
                         {"scale": torch.tensor(v.grid.scale, dtype=torch.float64)}))
        elif v.kind == "a":
            t = {"scale": v.scale.reshape(v.scale.shape[1:])}
            if v.offset is not None:
                t["offset"] = v.offset.reshape(v.offset.shape[1:])
            self.emit(Op("dequantize", [v.name], name, {}, t))
        else:
            raise ValueError("the network output is the float input: nothing to run on integers")
        return name


__all__ = ["BIAS_MODES", "Emitter", "Layer", "Value", "codes", "uniform_in_windows"]

"""Integer-only inference of a quantized model (Jacob et al., arXiv 1712.05877; FQN, CVPR 2019).

:func:`to_integer` walks the ``torch.fx`` graph of a calibrated or trained quantized model (the output of
:func:`qcnn.quantize`) and compiles it into an :class:`IntegerModel`: a flat list of integer operations whose
parameters are read only from the quantizers' grids (``grid()``) and the layers' float parameters. Between
quantizing the input and dequantizing the output only integer arithmetic runs (int64 tensors):

* **conv / linear**: ``acc = sign * sum (x - z_x)(w - z_w) + bias``, ``bias = round(b / (s_x s_w))`` (int32).
  The sum is the FQN formula ``sum A W - z_w sum A - z_a sum W + N z_a z_w`` in its centred form. It is
  evaluated as one matrix product per group (im2col with ``F.unfold``) on float64 tensors: every product and
  partial sum is an integer of magnitude below ``K * 2^(bx-1+1) * 2^(bw+1) < 2^53`` (``K`` = fan-in, checked
  at compile time), and float64 represents every integer below 2^53 exactly, so each addition is exact
  whatever the summation order or blocking of the BLAS kernel (no FFT/Winograd is involved: a plain GEMM).
* **BatchNorm** after a conv (frozen statistics) is folded into the per-channel real scale of the accumulator
  ``S = s_x s_w gamma / sigma``; a negative scale flips the sign of the channel (``sign``) so ``S > 0``.
* **requantize** an accumulator to the grid of the quantizer that consumes it:
  ``q = clamp(MBQM(acc, M0, e) + z_out, lo, hi)`` with ``M = S / s_out`` (gemmlowp, see
  :mod:`qcnn.integer.requant`). ReLU / ReLU6 are folded into ``lo``/``hi`` (quantization is monotone, so
  ``quant(relu(v)) = max(quant(v), z)``); before a non-monotone consumer (average pool, add) they are clamps
  on the accumulator.
* **rescale** codes from one activation grid to another (a ReLU'd residual sum feeding a conv whose input
  quantizer has its own range): ``q' = clamp(MBQM(q - z, M0, e) + z', ...)``, ``M = s / s'``.
* **residual add** (``QAdd``): each operand is rescaled with its own multiplier to the output grid with
  ``F`` extra fractional bits, the int sums are added, and one ``RoundingDivideByPOT(., F)`` rounds to the
  output grid: ``q = clamp(RDBPOT(sum_i MBQM(x_i - z_i, M_i 2^F), F) + z_out)``.
* **pooling**: max pool on codes; average pool as an integer window sum whose real scale is ``s / K`` (the
  next requantization divides by ``K``); flatten / reshape / slicing / zero padding (by ``z``) move codes.

The fake-quant simulation (the quantized model in eval mode) defines the expected codes. The engine rounds
exactly once per quantizer where the simulation does, with the simulation's own rule (``x * fl32(1/s)``)
and 31-bit multipliers on int64 products (``requant="int64"``), so it reproduces the simulation evaluated in
float64 (:func:`qcnn.integer.agreement.simulation_codes` with ``dtype=torch.float64``) code for code, end to
end on ResNet-20; the float32 simulation differs from both where its own rounding error crosses a tie (see
docs/integer.md).
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qcnn.integer.requant import (
    multiply_by_quantized_multiplier,
    pack_int4,
    quantize_multiplier,
    rounding_divide_by_pot,
    unpack_int4,
    wide_multipliers,
    wide_requantize,
)
from qcnn.io import write_text, write_with
from qcnn.nn.layers import QAdd, QConv2d, QLinear
from qcnn.quant.base import GradientQuantizer, Quantizer

#: extra fractional bits of the int32 (gemmlowp) scheme's intermediate sums (reduced to avoid overflow)
ADD_FRAC_BITS = 16
#: requantization schemes: ``int64`` one rounding of int64 products (default); ``int32`` gemmlowp's MBQM
REQUANT_SCHEMES = ("int64", "int32")
_RELU_FUNCS = {F.relu, torch.relu, torch.relu_}
_MAXPOOL_FUNCS = {F.max_pool2d, torch.max_pool2d}
_AVGPOOL_FUNCS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)


# -- activation grids ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActGrid:
    """Per-tensor uniform activation grid ``v = scale * (q - zero_point)``, ``q in [qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int

    @classmethod
    def from_quantizer(cls, q: nn.Module, where: str) -> ActGrid:
        if not isinstance(q, Quantizer):
            raise ValueError(f"{where}: {type(q).__name__} is not a quantizer with a grid; integer inference needs "
                             "every layer input quantized (recipe first_last '8bit' or 'same', no skipped layers)")
        if not q.is_initialized():
            raise ValueError(f"{where}: quantizer is not calibrated; calibrate or train the model first")
        g = q.grid()
        if not g.is_uniform or g.scale is None:
            raise ValueError(f"{where}: {type(q).__name__} has a non-uniform grid; the integer engine supports "
                             "uniform (scale, zero point) activation grids only")
        if g.scale.numel() != 1:
            raise ValueError(f"{where}: per-channel activation grids are not supported (scale shape "
                             f"{tuple(g.scale.shape)})")
        zp = int(g.zero_point.reshape(-1)[0]) if g.zero_point is not None else 0
        return cls(float(np.float32(g.scale.reshape(-1)[0].item())), zp, int(g.qmin), int(g.qmax), int(g.bits))

    @property
    def inv_scale(self) -> float:
        return float(np.float32(1.0) / np.float32(self.scale))

    def code(self, v: float) -> int:
        """Code of the real value ``v`` the way the fake-quant kernels compute it (float32, ties to even)."""
        q = float(np.rint(np.float32(v) * np.float32(self.inv_scale))) + self.zero_point
        return int(min(max(q, self.qmin), self.qmax))

    def to_json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax,
                "bits": self.bits}


@dataclass
class Op:
    """One integer operation: ``kind``, input value names, output value name, JSON attributes, tensors."""

    kind: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class _Val:
    """Compile-time description of a value: ``f`` float (network input), ``q`` codes on ``grid``,
    ``a`` integer accumulator whose real value is ``scale * acc`` (``scale`` broadcasts over the value)."""

    kind: str
    name: str
    grid: ActGrid | None = None
    scale: Tensor | None = None  # float64, shape (1, ...) broadcastable
    lo: float | None = None  # pending real clamp (ReLU, ReLU6) not yet applied
    hi: float | None = None
    bound: float = 0.0  # max |integer value| (centred codes for q)
    producer: Op | None = None
    shape: tuple[int, ...] = ()
    offset: Tensor | None = None  # float64 real offset: value = scale * acc + offset (bias kept exact)

    def copy(self, **kw) -> _Val:
        d = dict(self.__dict__)
        d.update(kw)
        return _Val(**d)


# -- runtime kernels -----------------------------------------------------------------------------------------
def _windows(x: Tensor, k, s, p, d, pad_value):
    """Strided views of the zero-padded ``x`` (N, C, H, W), one per kernel tap."""
    if p[0] or p[1]:
        x = F.pad(x, (p[1], p[1], p[0], p[0]), value=pad_value)
    h, w = x.shape[-2:]
    ho = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
    for i in range(k[0]):
        for j in range(k[1]):
            r0, c0 = i * d[0], j * d[1]
            yield i, j, x[..., r0: r0 + s[0] * (ho - 1) + 1: s[0], c0: c0 + s[1] * (wo - 1) + 1: s[1]]


def int_conv2d(x: Tensor, w: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """Exact integer convolution of centred int codes ``x`` with centred int weights ``w`` (float64 GEMMs)."""
    n, c = x.shape[:2]
    co, cig, kh, kw = w.shape
    if cig == 1 and co == groups:  # depthwise: one int64 multiply-add per tap (exact)
        wd = w.to(torch.int64).reshape(1, co, kh, kw)
        out = None
        for i, j, xs in _windows(x.to(torch.int64), (kh, kw), stride, padding, dilation, 0):
            t = xs * wd[:, :, i, j, None, None]
            out = t if out is None else out + t
        return out
    # im2col + one GEMM per group: (N*L, K) @ (K, co/g) on float64, every partial sum an integer < 2^53
    xf = x.to(torch.float64)
    h, wd = x.shape[-2:]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    wf = w.to(torch.float64).reshape(groups, co // groups, cig * kh * kw)
    outs = []
    for g in range(groups):
        xg = xf[:, g * cig:(g + 1) * cig] if groups > 1 else xf
        cols = F.unfold(xg, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, K, L)
        y = torch.matmul(cols.transpose(1, 2).reshape(-1, cols.shape[1]), wf[g].t())  # (N*L, co/g)
        outs.append(y.reshape(n, ho * wo, co // groups))
    out = torch.cat(outs, dim=2) if groups > 1 else outs[0]
    return out.transpose(1, 2).reshape(n, co, ho, wo).to(torch.int64)


def _run_conv(op: Op, x: Tensor, cache: dict) -> Tensor:
    w = cache.get(id(op))
    if w is None:
        t = op.tensors
        shape = [-1] + [1] * (t["weight"].dim() - 1)
        w = (t["weight"].to(torch.int64) - t["weight_zero_point"].to(torch.int64).reshape(shape))
        w = (w * t["sign"].to(torch.int64).reshape(shape)).to(x.device)
        cache[id(op)] = w
    xc = x - op.attrs["input_zero_point"]
    a = op.attrs
    if op.kind == "conv":
        acc = int_conv2d(xc, w, a["stride"], a["padding"], a["dilation"], a["groups"])
        bias = op.tensors["bias"].to(x.device, torch.int64).reshape(1, -1, 1, 1)
    else:
        acc = torch.matmul(xc.to(torch.float64), w.to(torch.float64).t()).to(torch.int64)
        bias = op.tensors["bias"].to(x.device, torch.int64)
    return acc + bias


def _run_requant(op: Op, x: Tensor, cache: dict) -> Tensor:
    t = op.tensors
    if "input_zero_point" in op.attrs:
        x = x - op.attrs["input_zero_point"]
    if op.attrs.get("scheme") == "int64":
        y = wide_requantize([x], [t["multiplier"]], t["rshift"], t["offset"])
        return torch.clamp(y + op.attrs["zero_point"], op.attrs["lo"], op.attrs["hi"])
    y = multiply_by_quantized_multiplier(x, t["multiplier"].to(x.device), t["shift"].to(x.device))
    if "offset" in t:  # bias in output units with frac_bits fractional bits, one rounding at the end
        y = rounding_divide_by_pot(y + t["offset"].to(x.device), op.attrs["frac_bits"])
    return torch.clamp(y + op.attrs["zero_point"], op.attrs["lo"], op.attrs["hi"])


def _run_quantize(op: Op, x: Tensor, cache: dict) -> Tensor:
    a = op.attrs
    xf = x.double()  # the exact product x * fl32(1/s), as the float64 simulation rounds it
    if a.get("lo_real") is not None or a.get("hi_real") is not None:
        xf = torch.clamp(xf, a.get("lo_real"), a.get("hi_real"))
    q = torch.round(xf * a["inv_scale"]).to(torch.int64) + a["zero_point"]
    return torch.clamp(q, a["qmin"], a["qmax"])


def _run_add(op: Op, *xs: Tensor, cache: dict) -> Tensor:
    a, t = op.attrs, op.tensors
    if a.get("scheme") == "int64":
        xs = [x - a["input_zero_points"][i] for i, x in enumerate(xs)]
        y = wide_requantize(xs, [t[f"multiplier{i}"] for i in range(len(xs))], t["rshift"], t["offset"],
                            [t[f"lshift{i}"] for i in range(len(xs))])
        return torch.clamp(y + a["zero_point"], a["lo"], a["hi"])
    total = 0
    for i, x in enumerate(xs):
        x = x - a["input_zero_points"][i]
        total = total + multiply_by_quantized_multiplier(x, t[f"multiplier{i}"].to(x.device),
                                                         t[f"shift{i}"].to(x.device))
    if "offset" in t:
        total = total + t["offset"].to(total.device)
    y = rounding_divide_by_pot(total, a["frac_bits"]) + a["zero_point"]
    return torch.clamp(y, a["lo"], a["hi"])


def _run_clamp(op: Op, x: Tensor, cache: dict) -> Tensor:
    if "pre_shift" in op.tensors:
        x = torch.bitwise_left_shift(x, op.tensors["pre_shift"].to(x.device))
    if "add" in op.tensors:
        x = x + op.tensors["add"].to(x.device)
    lo = op.tensors.get("lo")
    hi = op.tensors.get("hi")
    if lo is not None:
        x = torch.maximum(x, lo.to(x.device))
    if hi is not None:
        x = torch.minimum(x, hi.to(x.device))
    return x


def _run_maxpool(op: Op, x: Tensor, cache: dict) -> Tensor:
    a = op.attrs
    out = None
    for _, _, xs in _windows(x, a["kernel"], a["stride"], a["padding"], a["dilation"], -(2**62)):
        out = xs if out is None else torch.maximum(out, xs)
    return out


def _run_sumpool(op: Op, x: Tensor, cache: dict) -> Tensor:
    a = op.attrs
    x = x - a.get("input_zero_point", 0)
    if a.get("global"):
        return x.sum(dim=(-2, -1), keepdim=True)
    out = None
    for _, _, xs in _windows(x, a["kernel"], a["stride"], a["padding"], [1, 1], 0):
        out = xs if out is None else out + xs
    return out


def _run_reshape(op: Op, x: Tensor, cache: dict) -> Tensor:
    return x.reshape([x.shape[0]] + list(op.attrs["shape"]))


def _index_from_json(spec):
    out = []
    for s in spec:
        if isinstance(s, list):
            out.append(slice(*s))
        elif s == "...":
            out.append(Ellipsis)
        elif s is None:
            out.append(None)
        else:
            out.append(int(s))
    return tuple(out)


def _run_getitem(op: Op, x: Tensor, cache: dict) -> Tensor:
    return x[_index_from_json(op.attrs["index"])]


def _run_pad(op: Op, x: Tensor, cache: dict) -> Tensor:
    return F.pad(x, op.attrs["pad"], value=op.attrs["value"])


def _run_dequantize(op: Op, x: Tensor, cache: dict) -> Tensor:
    x = x - op.attrs.get("zero_point", 0)
    y = x.to(torch.float64) * op.tensors["scale"].to(x.device)
    if "offset" in op.tensors:
        y = y + op.tensors["offset"].to(x.device)
    return y.float()


_KERNELS = {
    "quantize": _run_quantize,
    "conv": _run_conv,
    "linear": _run_conv,
    "requant": _run_requant,
    "clamp": _run_clamp,
    "maxpool": _run_maxpool,
    "sumpool": _run_sumpool,
    "reshape": _run_reshape,
    "getitem": _run_getitem,
    "pad": _run_pad,
    "dequantize": _run_dequantize,
}


class IntegerModel(nn.Module):
    """A compiled integer-only network: ``ops`` run in order on int64 tensors.

    ``points`` maps each quantizer of the source model (``<module>.input_quant``, ``<qadd>.out_quant``) to the
    value that holds its codes, so the codes can be compared with the fake-quant simulation.
    """

    def __init__(self, ops: list[Op], input_name: str, output_names: list[str], points: dict[str, str],
                 input_shape: tuple[int, ...], meta: dict | None = None):
        super().__init__()
        self.ops = ops
        self.input_name = input_name
        self.output_names = output_names
        self.points = points
        self.input_shape = tuple(input_shape)
        self.meta = dict(meta or {})
        self._cache: dict = {}

    @torch.no_grad()
    def run(self, x: Tensor, force: dict[str, Tensor] | None = None, record: bool = False):
        """Run on float input ``x``. ``force`` replaces the codes of the named quantizer points (teacher
        forcing, to test each layer on exactly the simulation's inputs); ``codes`` (with ``record``) are the
        codes the engine computed at each point, before any forcing. Returns ``(outputs, codes)``."""
        env: dict[str, Tensor] = {self.input_name: x}
        codes: dict[str, Tensor] = {}
        key_to_points: dict[str, list[str]] = {}
        for p, k in self.points.items():
            key_to_points.setdefault(k, []).append(p)
        for op in self.ops:
            args = [env[i] for i in op.inputs]
            if op.kind == "add":
                y = _run_add(op, *args, cache=self._cache)
            else:
                y = _KERNELS[op.kind](op, *args, self._cache)
            if record:
                for p in key_to_points.get(op.output, ()):
                    codes[p] = y
            if force:
                for p in key_to_points.get(op.output, ()):
                    if p in force:
                        y = force[p].to(y.device, torch.int64)
            env[op.output] = y
        outs = [env[n] for n in self.output_names]
        return (outs[0] if len(outs) == 1 else outs), codes

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]

    @torch.no_grad()
    def value_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every value for a batch of one (runs the model on zeros)."""
        env: dict[str, Tensor] = {self.input_name: torch.zeros((1,) + self.input_shape)}
        for op in self.ops:
            args = [env[i] for i in op.inputs]
            env[op.output] = _run_add(op, *args, cache={}) if op.kind == "add" else _KERNELS[op.kind](op, *args, {})
        return {k: tuple(v.shape) for k, v in env.items()}

    # -- plain-file export -------------------------------------------------------------------------------
    def describe(self) -> dict:
        """JSON-able description of the graph (tensors are referenced by their npz key)."""
        ops = []
        for i, op in enumerate(self.ops):
            d = {"id": i, "op": op.kind, "inputs": op.inputs, "output": op.output, **op.attrs}
            d["tensors"] = {k: f"{i}.{k}" for k in op.tensors}
            ops.append(d)
        return {"format": "qcnn-integer", "version": 1, "input": self.input_name, "input_shape": list(self.input_shape),
                "outputs": self.output_names, "points": self.points, "meta": self.meta, "ops": ops}

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (integer weights, biases, multipliers, shifts, scales) and ``<path>.json``."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
        arrays = {}
        desc = self.describe()
        for i, op in enumerate(self.ops):
            for k, t in op.tensors.items():
                a = t.detach().cpu().numpy()
                if k == "weight" and op.attrs.get("weight_bits", 8) <= 4:
                    arrays[f"{i}.{k}"] = pack_int4(a, op.attrs["weight_qmin"])
                    desc["ops"][i]["weight_storage"] = "int4-packed"
                    desc["ops"][i]["weight_shape"] = list(a.shape)
                else:
                    arrays[f"{i}.{k}"] = a
        npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
        npz.parent.mkdir(parents=True, exist_ok=True)
        write_with(npz, lambda f: np.savez(f, **arrays))
        write_text(js, json.dumps(desc, indent=1))
        return npz, js

    @classmethod
    def load(cls, path: str | Path) -> IntegerModel:
        """Load a model written by :meth:`save` (needs only the ``.npz`` and ``.json`` files)."""
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
        desc = json.loads(stem.with_suffix(".json").read_text())
        if desc.get("format") != "qcnn-integer":
            raise ValueError(f"{stem.with_suffix('.json')} is not a qcnn integer model description")
        arrays = np.load(stem.with_suffix(".npz"))
        ops = []
        for d in desc["ops"]:
            d = dict(d)
            i, kind, inputs, output = d.pop("id"), d.pop("op"), d.pop("inputs"), d.pop("output")
            tensors = {}
            for k, key in d.pop("tensors").items():
                a = arrays[key]
                if k == "weight" and d.get("weight_storage") == "int4-packed":
                    a = unpack_int4(a, d["weight_qmin"], tuple(d["weight_shape"]))
                tensors[k] = torch.from_numpy(np.array(a))
            d.pop("weight_storage", None)
            d.pop("weight_shape", None)
            del i
            ops.append(Op(kind, inputs, output, d, tensors))
        return cls(ops, desc["input"], desc["outputs"], desc["points"], tuple(desc["input_shape"]), desc["meta"])


# -- compiler ------------------------------------------------------------------------------------------------
def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _index_to_json(idx) -> list:
    if not isinstance(idx, tuple):
        idx = (idx,)
    out = []
    for s in idx:
        if isinstance(s, slice):
            out.append([s.start, s.stop, s.step])
        elif s is Ellipsis:
            out.append("...")
        elif s is None or isinstance(s, int):
            out.append(s)
        else:
            raise ValueError(f"unsupported index {s!r} in a slicing node")
    return out


def _frac_bits(terms, cap: int = ADD_FRAC_BITS) -> int:
    """Fractional bits F such that each ``x * 2^left`` of ``MBQM(x, M 2^F)`` stays below 2^31 (int32)."""
    frac = cap
    for m, bound in terms:
        _, e = quantize_multiplier(torch.as_tensor(m, dtype=torch.float64))
        frac = min(frac, int(math.floor(31 - math.log2(max(bound, 1.0)) - 1 - int(e.max()))))
    return max(frac, 0)


class _Compiler:
    def __init__(self, gm: fx.GraphModule, bias_mode: str = "output", requant: str = "int64"):
        if bias_mode not in ("output", "accumulator"):
            raise ValueError(f"bias_mode={bias_mode!r} must be 'output' or 'accumulator'")
        if requant not in REQUANT_SCHEMES:
            raise ValueError(f"requant={requant!r} must be one of {REQUANT_SCHEMES}")
        self.bias_mode = bias_mode
        self.requant = requant
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.ops: list[Op] = []
        self.vals: dict[str, _Val] = {}
        self.points: dict[str, str] = {}
        self.cache: dict[tuple, str] = {}
        self.n = 0
        self.input_name = None
        self.input_shape = None
        self.outputs: list[str] = []

    def fresh(self, base: str) -> str:
        self.n += 1
        return f"{base}#{self.n}"

    def emit(self, op: Op) -> Op:
        self.ops.append(op)
        return op

    # helpers
    def _shape(self, node: fx.Node) -> tuple[int, ...]:
        tm = node.meta.get("tensor_meta")
        if tm is None or not hasattr(tm, "shape"):
            raise ValueError(f"node {node.name!r} has no tensor shape (unsupported multi-output node)")
        return tuple(tm.shape)

    def materialize(self, v: _Val, offset: bool = False, headroom: int = 1) -> _Val:
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
            # (the shifted value stays below 2^30, so its multiplier keeps 31 bits; int64 allows up to 24 bits)
            off = v.offset / v.scale
            top, cap = (30, 24) if self.requant == "int64" else (30, 12)
            k = max(0, min(cap, int(math.floor(top - math.log2(max((bound + float(off.abs().max())) * headroom,
                                                                       1.0))))))
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
        return _Val("a", out, scale=scale, bound=bound, shape=v.shape)

    def to_grid(self, v: _Val, g: ActGrid, point: str | None) -> str:
        """Name of the codes of ``v`` on grid ``g`` (emitting quantize / requant / rescale as needed)."""
        key = (v.name, v.lo, v.hi, g)
        if v.kind == "q" and v.grid == g:
            name = v.name
        elif key in self.cache:
            name = self.cache[key]
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
                if v.kind == "q":
                    m = torch.tensor(v.grid.scale * g.inv_scale, dtype=torch.float64)
                    extra = {"input_zero_point": v.grid.zero_point, "input_grid": v.grid.to_json()}
                else:
                    m = v.scale * g.inv_scale
                    extra = {}
                    if v.bound >= 2**32 and self.requant == "int32":  # x * M0 exact in int64 for |x| < 2^32
                        raise ValueError(f"accumulator {v.name!r} may exceed 32 bits (bound {v.bound:.3g}); "
                                         "use fewer bits or a smaller fan-in")
                tensors = {"real_multiplier": m.to(torch.float64)}
                off = v.offset * g.inv_scale if v.offset is not None and self.bias_mode == "output" else None
                if self.requant == "int64":  # one rounding of the int64 sum x K + offset
                    (k,), _, n, o = wide_multipliers([(m, v.bound)], off)
                    extra["scheme"] = "int64"
                    tensors.update(multiplier=k, rshift=n, offset=o)
                else:
                    if self.bias_mode == "output":  # F extra fractional bits, one final rounding
                        frac = _frac_bits([(m, v.bound)])
                        extra["frac_bits"] = frac
                        off = off if off is not None else torch.zeros(m.shape, dtype=torch.float64)
                        tensors["offset"] = torch.round(off * 2.0**frac).to(torch.int64)
                        m = m * 2.0**frac
                    m0, e = quantize_multiplier(m)
                    tensors.update(multiplier=m0, shift=e)
                self.emit(Op("requant", [v.name], name,
                             {"zero_point": g.zero_point, "lo": lo, "hi": hi, "grid": g.to_json(), **extra},
                             tensors))
            self.cache[key] = name
        if point is not None:
            self.points[point] = name
        return name

    def q_val(self, name: str, g: ActGrid, shape) -> _Val:
        return _Val("q", name, grid=g, bound=max(abs(g.qmin - g.zero_point), abs(g.qmax - g.zero_point)),
                    shape=tuple(shape))

    # layers
    def linear_layer(self, node: fx.Node, mod: nn.Module, v: _Val) -> _Val:
        name = node.target
        g_in = ActGrid.from_quantizer(mod.input_quant, f"layer {name!r} input")
        x = self.to_grid(v, g_in, f"{name}.input_quant")
        if mod.weight_quant is None:
            raise ValueError(f"layer {name!r} has float weights; integer inference needs quantized weights")
        w_fq = mod.quantized_weight().detach()
        wg = mod.weight_quant.grid()
        if not wg.is_uniform:
            raise ValueError(f"layer {name!r}: weight quantizer {type(mod.weight_quant).__name__} has a non-uniform "
                             "grid (codebook); the integer engine needs a uniform grid")
        if wg.axis not in (None, 0):
            raise ValueError(f"layer {name!r}: per-channel weight grid along axis {wg.axis} (expected 0)")
        codes = wg.to_codes(w_fq)
        co = w_fq.shape[0]
        s_w = wg.scale.to(torch.float64).reshape(-1).expand(co) if wg.scale.numel() == 1 else \
            wg.scale.to(torch.float64).reshape(-1)
        zw = wg.zero_point.reshape(-1) if wg.zero_point is not None else torch.zeros(1, dtype=torch.int32)
        zw = zw.expand(co).to(torch.int32).clone()
        # exactness check: the centred codes must reproduce the fake-quantized weight
        shape = [-1] + [1] * (w_fq.dim() - 1)
        recon = (codes - zw.reshape(shape)).double() * s_w.reshape(shape)
        if not torch.allclose(recon, w_fq.double(), rtol=1e-5, atol=1e-6 * float(s_w.max())):
            raise ValueError(f"layer {name!r}: the weight quantizer's output is not on its reported grid")
        dtype = torch.int8 if wg.qmin >= -128 and wg.qmax <= 127 else (
            torch.uint8 if wg.qmin >= 0 and wg.qmax <= 255 else torch.int16 if wg.bits <= 16 else torch.int32)
        bq = getattr(mod, "bias_quant", None)
        if bq is not None and mod.bias is not None:  # the bias grid's exact values (float32 would round them)
            b = bq(mod.bias.detach().to(torch.float64), mod)
        else:
            b = mod.bias
        bias = b.detach().to(torch.float64) if b is not None else torch.zeros(co, dtype=torch.float64)
        is_conv = isinstance(mod, nn.Conv2d)
        if is_conv and mod.padding_mode != "zeros":
            raise ValueError(f"layer {name!r}: padding_mode={mod.padding_mode!r} is not supported (zeros only)")
        if is_conv and isinstance(mod.padding, str):
            raise ValueError(f"layer {name!r}: string padding {mod.padding!r} is not supported")
        attrs = {"layer": name, "input_zero_point": g_in.zero_point, "input_scale": g_in.scale,
                 "weight_bits": wg.bits, "weight_qmin": wg.qmin, "weight_qmax": wg.qmax}
        if is_conv:
            attrs.update(stride=_pair(mod.stride), padding=_pair(mod.padding), dilation=_pair(mod.dilation),
                         groups=int(mod.groups))
        fan_in = w_fq[0].numel()
        bx = max(abs(g_in.qmin - g_in.zero_point), abs(g_in.qmax - g_in.zero_point))
        bw = float((codes - zw.reshape(shape)).abs().max()) if codes.numel() else 0.0
        if fan_in * bx * bw >= 2**53:
            raise ValueError(f"layer {name!r}: accumulator bound {fan_in * bx * bw:.3g} exceeds 2^53")
        out = self.fresh(name)
        op = self.emit(Op("conv" if is_conv else "linear", [x], out, attrs,
                          {"weight": codes.to(dtype), "weight_zero_point": zw, "weight_scale": s_w.clone()}))
        op.attrs["_real"] = (g_in.scale * s_w, bias, fan_in * bx * bw)
        val = _Val("a", out, producer=op, shape=self._shape(node))
        self._finalize(op, val)
        oq = mod.out_quant
        if oq is not None and not isinstance(oq, GradientQuantizer):
            g_out = ActGrid.from_quantizer(oq, f"layer {name!r} output")
            codes_name = self.to_grid(val, g_out, f"{name}.out_quant")
            return self.q_val(codes_name, g_out, val.shape)
        return val

    def _finalize(self, op: Op, val: _Val) -> None:
        """(Re)compute sign, int bias and the accumulator scale of a conv/linear from its real scale/bias."""
        s, b, bound = op.attrs["_real"]
        if bool((s == 0).any()):
            raise ValueError(f"layer {op.attrs['layer']!r}: a channel has zero scale (BatchNorm gamma = 0)")
        sign = torch.where(s < 0, -1, 1).to(torch.int8)
        s_abs = s.abs()
        bias_int = torch.round(b / s_abs).to(torch.int64)
        op.tensors["sign"] = sign
        op.tensors["acc_scale"] = s_abs
        op.tensors["bias_real"] = b.clone()
        ndim = len(val.shape)
        val.scale = s_abs.reshape([1, -1] + [1] * (ndim - 2))
        if self.bias_mode == "accumulator":
            if bool((bias_int.abs() >= 2**31).any()):
                raise ValueError(f"layer {op.attrs['layer']!r}: bias does not fit int32 (|b / (s_x s_w)| >= 2^31)")
            op.tensors["bias"] = bias_int.to(torch.int32)
            val.bound = bound + float(bias_int.abs().max())
            val.offset = None
        else:  # the bias stays exact: added in the output units of each consumer (see requant/add)
            op.tensors["bias"] = torch.zeros_like(bias_int, dtype=torch.int32)
            val.bound = bound
            val.offset = b.reshape(val.scale.shape).clone()

    def batchnorm(self, node: fx.Node, bn: nn.Module, v: _Val) -> _Val:
        prod = v.producer
        src = node.args[0]
        if v.kind != "a" or prod is None or prod.kind not in ("conv", "linear") or len(src.users) != 1 or \
                v.lo is not None or v.hi is not None:
            raise ValueError(f"BatchNorm {node.target!r} does not directly follow a conv/linear layer (it follows "
                             f"{src.name!r}); only conv -> BN can run on integers (fold it first)")
        if bn.running_var is None:
            raise ValueError(f"BatchNorm {node.target!r} has no running statistics")
        sigma = torch.sqrt(bn.running_var.double() + bn.eps)
        gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(sigma)
        f = gamma / sigma
        s, b, bound = prod.attrs["_real"]
        prod.attrs["_real"] = (s * f, (b - bn.running_mean.double()) * f + beta, bound)
        prod.attrs.setdefault("folded_batchnorm", node.target)
        self._finalize(prod, v)
        return v

    def clamp(self, v: _Val, lo: float | None, hi: float | None) -> _Val:
        if v.kind == "q":
            g = v.grid
            lo_c = torch.tensor(max(g.qmin, g.code(lo)) if lo is not None else g.qmin)
            hi_c = torch.tensor(min(g.qmax, g.code(hi)) if hi is not None else g.qmax)
            out = self.fresh(v.name)
            self.emit(Op("clamp", [v.name], out, {"lo_real": lo, "hi_real": hi}, {"lo": lo_c, "hi": hi_c}))
            return self.q_val(out, g, v.shape)
        nlo = lo if v.lo is None else (v.lo if lo is None else max(v.lo, lo))
        nhi = hi if v.hi is None else (v.hi if hi is None else min(v.hi, hi))
        return v.copy(lo=nlo, hi=nhi)

    def sumpool(self, v: _Val, node: fx.Node, kernel, stride, padding, count: int, glob: bool) -> _Val:
        v = self.materialize(v, offset=bool(padding[0] or padding[1]), headroom=count)
        if v.kind == "f":
            raise ValueError(f"pooling node {node.name!r} acts on the float input before any quantizer")
        attrs = {"kernel": kernel, "stride": stride, "padding": padding, "global": glob}
        if v.kind == "q":
            attrs["input_zero_point"] = v.grid.zero_point
            scale = torch.tensor([v.grid.scale], dtype=torch.float64).reshape(1, 1, 1, 1) / count
        else:
            scale = v.scale / count
        out = self.fresh(node.name)
        self.emit(Op("sumpool", [v.name], out, attrs))
        return _Val("a", out, scale=scale, bound=v.bound * count, shape=self._shape(node), offset=v.offset)

    def passthrough(self, v: _Val, op: Op, node: fx.Node, scale_fn=None, offset_fn=None) -> _Val:
        self.emit(op)
        scale, offset = v.scale, v.offset
        full = (1,) + tuple(v.shape[1:])
        if v.kind == "a" and scale_fn is not None:
            scale = scale_fn(scale.expand(full).contiguous())
            if offset is not None:
                offset = (offset_fn or scale_fn)(offset.expand(full).contiguous())
        return v.copy(name=op.output, scale=scale, offset=offset, producer=None, shape=self._shape(node))

    def reshape(self, node: fx.Node, v: _Val) -> _Val:
        shape = list(self._shape(node)[1:])
        op = Op("reshape", [v.name], self.fresh(node.name), {"shape": shape})
        return self.passthrough(v, op, node, lambda s: s.reshape([1] + shape))

    def add(self, node: fx.Node, mod: QAdd, a: _Val, b: _Val) -> _Val:
        if mod.out_quant is None:
            raise ValueError(f"residual add {node.target!r} has no output quantizer")
        g = ActGrid.from_quantizer(mod.out_quant, f"add {node.target!r} output")
        names, zps, mults = [], [], []
        offset = None
        for v in (a, b):
            v = self.materialize(v)
            if v.kind == "a" and v.offset is not None:
                o = v.offset * g.inv_scale
                offset = o if offset is None else offset + o
            if v.kind == "f":
                raise ValueError(f"add {node.target!r} consumes the float network input")
            names.append(v.name)
            if v.kind == "q":
                zps.append(v.grid.zero_point)
                mults.append((torch.tensor(v.grid.scale * g.inv_scale, dtype=torch.float64), v.bound))
            else:
                zps.append(0)
                mults.append((v.scale * g.inv_scale, v.bound))
        tensors = {}
        attrs = {"layer": node.target, "input_zero_points": zps, "zero_point": g.zero_point, "lo": g.qmin,
                 "hi": g.qmax, "grid": g.to_json()}
        if self.requant == "int64":  # sum_i x_i K_i + offset on int64, rounded once
            ks, ls, n, o = wide_multipliers(mults, offset)
            for i, (k, sh) in enumerate(zip(ks, ls)):
                tensors[f"multiplier{i}"], tensors[f"lshift{i}"] = k, sh
            tensors.update(rshift=n, offset=o)
            attrs["scheme"] = "int64"
        else:
            frac = _frac_bits(mults)
            attrs["frac_bits"] = frac
            if offset is not None:
                tensors["offset"] = torch.round(offset * 2.0**frac).to(torch.int64)
            for i, (m, _) in enumerate(mults):
                m0, e = quantize_multiplier(m * 2.0**frac)
                tensors[f"multiplier{i}"], tensors[f"shift{i}"] = m0, e
        out = self.fresh(node.target)
        self.emit(Op("add", names, out, attrs, tensors))
        self.points[f"{node.target}.out_quant"] = out
        return self.q_val(out, g, self._shape(node))

    def compile(self) -> IntegerModel:
        for node in self.gm.graph.nodes:
            self.visit(node)
        for op in self.ops:
            op.attrs.pop("_real", None)
        meta = {"layers": sum(op.kind in ("conv", "linear") for op in self.ops), "bias_mode": self.bias_mode,
                "requant": self.requant}
        return IntegerModel(self.ops, self.input_name, self.outputs, self.points, self.input_shape, meta)

    def arg(self, node: fx.Node, i: int = 0) -> _Val:
        a = node.args[i]
        if not isinstance(a, fx.Node) or a.name not in self.vals:
            raise ValueError(f"node {node.name!r}: argument {i} is not a tensor value the engine knows")
        return self.vals[a.name]

    def visit(self, node: fx.Node) -> None:  # noqa: C901 - one dispatch table over fx node kinds
        op, tgt = node.op, node.target
        if op == "placeholder":
            if self.input_name is not None:
                raise ValueError(f"the integer engine supports one network input; found a second: {node.name!r}")
            self.input_name = node.name
            self.input_shape = self._shape(node)[1:]
            self.vals[node.name] = _Val("f", node.name, shape=self._shape(node))
            return
        if op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            for o in outs:
                v = self.materialize(self.vals[o.name])
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
                self.outputs.append(name)
            return
        if op == "call_method" and tgt == "size":
            return
        if op == "call_module":
            mod = self.modules[tgt]
            if hasattr(mod, "to_qconv"):  # QConvBn2d (FQN training): compile its folded QConv2d
                mod = mod.to_qconv()
            if isinstance(mod, (QConv2d, QLinear)):
                res = self.linear_layer(node, mod, self.arg(node))
            elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
                res = self.batchnorm(node, mod, self.arg(node))
            elif isinstance(mod, (nn.ReLU, nn.ReLU6)):
                res = self.clamp(self.arg(node), 0.0, 6.0 if isinstance(mod, nn.ReLU6) else None)
            elif isinstance(mod, nn.Hardtanh) and mod.min_val >= 0:
                res = self.clamp(self.arg(node), float(mod.min_val), float(mod.max_val))
            elif isinstance(mod, _IDENTITY_MODULES):
                res = self.arg(node)
            elif isinstance(mod, nn.Flatten):
                res = self.reshape(node, self.arg(node))
            elif isinstance(mod, nn.MaxPool2d):
                res = self.maxpool(node, self.arg(node), mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                                   mod.ceil_mode)
            elif isinstance(mod, nn.AvgPool2d):
                res = self.avgpool(node, self.arg(node), mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                                   mod.count_include_pad, mod.divisor_override)
            elif isinstance(mod, nn.AdaptiveAvgPool2d):
                res = self.adaptive(node, self.arg(node))
            elif isinstance(mod, QAdd):
                res = self.add(node, mod, self.arg(node, 0), self.arg(node, 1))
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                raise ValueError(f"layer {tgt!r} ({type(mod).__name__}) is not quantized; integer inference needs "
                                 "every layer quantized (recipe first_last '8bit' or 'same', no skip overrides)")
            else:
                raise ValueError(f"module {tgt!r} ({type(mod).__name__}) is not supported by the integer engine")
        elif op == "call_function":
            res = self.function(node)
        elif op == "call_method":
            res = self.method(node)
        else:
            raise ValueError(f"node {node.name!r} ({op} {tgt}) is not supported by the integer engine")
        self.vals[node.name] = res

    def maxpool(self, node, v, k, s, p, d, ceil):
        if ceil:
            raise ValueError(f"max pool {node.name!r}: ceil_mode=True is not supported")
        s = k if s is None or s == [] else s
        op = Op("maxpool", [v.name], self.fresh(node.name),
                {"kernel": _pair(k), "stride": _pair(s), "padding": _pair(p), "dilation": _pair(d)})
        if v.kind == "f":
            raise ValueError(f"max pool {node.name!r} acts on the float input before any quantizer")
        self.emit(op)
        return v.copy(name=op.output, producer=None, shape=self._shape(node))

    def avgpool(self, node, v, k, s, p, ceil, count_include_pad, divisor):
        k, p = _pair(k), _pair(p)
        s = k if s is None or s == [] else _pair(s)
        if ceil:
            raise ValueError(f"average pool {node.name!r}: ceil_mode=True is not supported")
        if (p[0] or p[1]) and not count_include_pad:
            raise ValueError(f"average pool {node.name!r}: count_include_pad=False with padding is not supported")
        count = divisor if divisor else k[0] * k[1]
        return self.sumpool(v, node, k, s, p, count, False)

    def adaptive(self, node, v):
        h, w = v.shape[-2:]
        oh, ow = self._shape(node)[-2:]
        if h % oh or w % ow:
            raise ValueError(f"adaptive average pool {node.name!r}: input {h}x{w} is not a multiple of {oh}x{ow}")
        if (oh, ow) == (1, 1):
            return self.sumpool(v, node, [h, w], [h, w], [0, 0], h * w, True)
        k = [h // oh, w // ow]
        return self.sumpool(v, node, k, k, [0, 0], k[0] * k[1], False)

    def function(self, node: fx.Node) -> _Val:
        tgt = node.target
        if tgt in _RELU_FUNCS:
            return self.clamp(self.arg(node), 0.0, None)
        if tgt is F.relu6:
            return self.clamp(self.arg(node), 0.0, 6.0)
        if tgt is F.hardtanh:
            lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
            hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
            if lo < 0:
                raise ValueError(f"hardtanh {node.name!r} with min_val={lo} < 0 is not supported")
            return self.clamp(self.arg(node), float(lo), float(hi))
        if tgt in (torch.flatten,):
            return self.reshape(node, self.arg(node))
        if tgt is F.dropout:
            return self.arg(node)
        if tgt is F.adaptive_avg_pool2d:
            return self.adaptive(node, self.arg(node))
        if tgt in _MAXPOOL_FUNCS:
            a = list(node.args[1:]) + [None] * 5
            kw = node.kwargs
            return self.maxpool(node, self.arg(node), kw.get("kernel_size", a[0]), kw.get("stride", a[1]),
                                kw.get("padding", a[2] or 0), kw.get("dilation", a[3] or 1),
                                kw.get("ceil_mode", a[4] or False))
        if tgt in _AVGPOOL_FUNCS:
            a = list(node.args[1:]) + [None] * 6
            kw = node.kwargs
            return self.avgpool(node, self.arg(node), kw.get("kernel_size", a[0]), kw.get("stride", a[1]),
                                kw.get("padding", a[2] or 0), kw.get("ceil_mode", a[3] or False),
                                kw.get("count_include_pad", True if a[4] is None else a[4]),
                                kw.get("divisor_override", a[5]))
        if tgt is operator.getitem:
            v = self.arg(node)
            idx = _index_to_json(node.args[1])
            first = idx[0] if idx else [None, None, None]
            if first == "..." or not (isinstance(first, list) and first == [None, None, None]):
                raise ValueError(f"slicing {node.name!r} must keep the batch dimension (x[:, ...])")
            op = Op("getitem", [v.name], self.fresh(node.name), {"index": idx})
            return self.passthrough(v, op, node, lambda s: s[_index_from_json(idx)])
        if tgt is F.pad:
            v = self.arg(node)
            pad = [int(t) for t in node.args[1]]
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            if mode != "constant" or (value not in (None, 0, 0.0)):
                raise ValueError(f"pad {node.name!r}: only constant zero padding is supported")
            v = self.materialize(v, offset=True) if v.offset is not None else v
            fill = v.grid.zero_point if v.kind == "q" else 0
            op = Op("pad", [v.name], self.fresh(node.name), {"pad": pad, "value": fill})
            return self.passthrough(v, op, node, lambda s: F.pad(s, pad, value=1.0))
        if tgt in (operator.add, torch.add, operator.iadd):
            raise ValueError(f"add {node.name!r} is not quantized; quantize with recipe quantize_adds=True")
        name = getattr(tgt, "__name__", str(tgt))
        raise ValueError(f"function {name!r} (node {node.name!r}) is not supported by the integer engine")

    def method(self, node: fx.Node) -> _Val:
        tgt = node.target
        if tgt in ("relu", "relu_"):
            return self.clamp(self.arg(node), 0.0, None)
        if tgt in _RESHAPE_METHODS:
            return self.reshape(node, self.arg(node))
        if tgt == "mean":
            v = self.arg(node)
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            dims = tuple(sorted(d % len(v.shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))))
            if dims != (2, 3):
                raise ValueError(f"mean {node.name!r} over dims {dims} is not supported (spatial (2, 3) only)")
            h, w = v.shape[-2:]
            res = self.sumpool(v, node if node.kwargs.get("keepdim", False) else node, [h, w], [h, w], [0, 0],
                               h * w, True)
            res.shape = tuple(v.shape[:2]) + (1, 1)
            if not node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2]):
                return self.reshape(node, res)
            return res
        raise ValueError(f"method {tgt!r} (node {node.name!r}) is not supported by the integer engine")


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


__all__ = ["ActGrid", "IntegerModel", "Op", "int_conv2d", "to_integer"]

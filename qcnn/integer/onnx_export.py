"""ONNX export of an :class:`~qcnn.integer.engine.IntegerModel`, and an ONNX Runtime runner.

Two forms, both built with ``onnx.helper`` directly from the compiled integer model, so what is exported is
exactly the integer model (same grids, int8 weights, int32 biases):

* ``form="qdq"`` (default, portable, opset 13): activations travel between layers as int8/uint8 codes,
  ``QuantizeLinear`` / ``DequantizeLinear`` carry each grid's scale and zero point, weights are int8
  initializers with per-channel ``DequantizeLinear(axis=0)``, biases are int32 with scale ``s_x s_w``. ONNX
  Runtime's graph optimiser fuses ``DQ -> Conv -> Q`` into ``QLinearConv``, ``DQ -> Add -> Q`` into
  ``QLinearAdd``, ``DQ -> Gemm -> Q`` into ``QGemm``, etc. (see :func:`optimized_op_counts`), but it keeps
  the graph NCHW and wraps its NHWC int8 kernels in ``Transpose`` nodes wherever a neighbour is not fused.
* ``form="qlinear"``: the QOperator form of :class:`_QLinearBuilder` for ONNX Runtime's CPU kernels:
  ``com.microsoft`` QLinearConv (``channels_last=1``) / QLinearAdd / QLinearGlobalAveragePool on uint8 codes
  in NHWC from the first layer to the last, one ``Transpose`` (of the uint8 input codes) in the whole graph.

Mapping of the integer operations in the QDQ form:

* ``quantize`` -> ``QuantizeLinear`` (a float ``Clip`` first for grids narrower than the 8-bit container);
* ``conv`` / ``linear`` -> ``DequantizeLinear(x)``, ``Conv`` / ``Gemm`` with ``DequantizeLinear`` weights and
  bias (a BatchNorm folded by the engine is folded into the per-channel weight scale; a negative BN scale
  negates the weight codes);
* ``requant`` -> optional ``Relu`` / ``Clip`` then ``QuantizeLinear`` (from codes: ``DequantizeLinear`` first);
* ``add`` -> ``DequantizeLinear`` of code operands, ``Add``, ``QuantizeLinear``;
* ``clamp`` on codes -> ``Clip`` on the int8/uint8 tensor; ``maxpool`` -> ``MaxPool`` (on codes directly);
  ``sumpool`` -> ``AveragePool`` / ``GlobalAveragePool``; ``reshape`` / ``getitem`` / ``pad`` ->
  ``Reshape`` / ``Slice`` / ``Pad``; ``dequantize`` -> ``DequantizeLinear``.

ONNX Runtime adds the bias in accumulator units (int32, as Jacob et al.) and requantizes in float32, so its
codes can differ from the simulation by one LSB where the value is near a rounding tie; with
:func:`qcnn.integer.add_bias_quantizers` the simulation uses the same int32 bias and only float ties remain.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qcnn.integer.engine import IntegerModel, Op

OPSET = 13
_TENSOR_TYPES = {np.uint8: 2, np.int8: 3, np.int64: 7}  # onnx.TensorProto UINT8, INT8, INT64


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is a dependency
        raise RuntimeError("ONNX export needs the 'onnx' package (pip install onnx)") from e
    return onnx, TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, im: IntegerModel):
        self.onnx, self.TP, self.helper, self.nph = _onnx()
        self.im = im
        self.nodes = []
        self.inits = []
        self.kind: dict[str, tuple] = {}  # value -> ("q", np dtype, scale, zp) | ("f",)
        self.n = 0
        self.shapes = im.value_shapes()  # engine value -> shape for a batch of one
        self.ndim = {k: len(v) for k, v in self.shapes.items()}

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base.replace('#', '_')}__{self.n}"

    def const(self, base: str, arr) -> str:
        n = self.name(base)
        self.inits.append(self.nph.from_array(np.asarray(arr), n))
        return n

    def input_clip(self, a: dict, x: str) -> str:
        """The float input clipped to the quantize op's real range, where it has one."""
        if a.get("lo_real") is None and a.get("hi_real") is None:
            return x
        lo = np.float32(a["lo_real"] if a.get("lo_real") is not None else -3.0e38)
        hi = np.float32(a["hi_real"] if a.get("hi_real") is not None else 3.0e38)
        return self.node("Clip", [x, self.const("lo", lo), self.const("hi", hi)], "input_clip")

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        out = self.name(base)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    @staticmethod
    def container(qmin: int, qmax: int, where: str):
        if qmin >= 0 and qmax <= 255:
            return np.uint8
        if qmin >= -128 and qmax <= 127:
            return np.int8
        raise ValueError(f"{where}: a {qmin}..{qmax} grid does not fit 8 bits; ONNX QDQ export supports <= 8 bits")

    def quant(self, x: str, grid: dict, lo: int, hi: int, base: str) -> str:
        """Float ``x`` -> codes on ``grid`` clamped to [lo, hi] (float Clip where the container is wider)."""
        dt = self.container(grid["qmin"], grid["qmax"], base)
        info = np.iinfo(dt)
        s, z = grid["scale"], grid["zero_point"]
        if lo > info.min or hi < info.max:
            if lo == z and hi == info.max:
                x = self.node("Relu", [x], base + "_relu")
            else:
                lo_r = np.float32(s * (lo - z)) if lo > info.min else np.float32(-3.0e38)
                hi_r = np.float32(s * (hi - z)) if hi < info.max else np.float32(3.0e38)
                x = self.node("Clip", [x, self.const("lo", lo_r), self.const("hi", hi_r)], base + "_clip")
        out = self.node("QuantizeLinear", [x, self.const("s", np.float32(s)), self.const("z", dt(z))], base)
        self.kind[out] = ("q", dt, s, z)
        return out

    def float_of(self, v: str, base: str) -> str:
        k = self.kind[v]
        if k[0] == "f":
            return v
        _, dt, s, z = k
        out = self.node("DequantizeLinear", [v, self.const("s", np.float32(s)), self.const("z", dt(z))], base)
        self.kind[out] = ("f",)
        return out

    # ops
    def op_quantize(self, op: Op, x: str) -> str:
        a = op.attrs
        x = self.input_clip(a, x)
        return self.quant(x, a["grid"], a["qmin"], a["qmax"], op.output)

    def op_linear(self, op: Op, x: str) -> str:
        a, t = op.attrs, op.tensors
        xf = self.float_of(x, op.output + "_x")
        w = t["weight"].numpy().astype(np.int64)
        zw = t["weight_zero_point"].numpy().astype(np.int64)
        sign = t["sign"].numpy().astype(np.int64)
        shape = [-1] + [1] * (w.ndim - 1)
        w = w * sign.reshape(shape)
        zw = zw * sign
        if w.min() < -128 or w.max() > 127 or zw.min() < -128 or zw.max() > 127:
            raise ValueError(f"layer {a['layer']!r}: weights need more than 8 bits (or a negative BatchNorm scale "
                             "negates a -128 code); ONNX export needs int8 weights")
        s_eff = (t["acc_scale"].numpy() / a["input_scale"]).astype(np.float32)
        bias = np.round(t["bias_real"].numpy() / (a["input_scale"] * s_eff.astype(np.float64)))
        if np.abs(bias).max(initial=0) >= 2**31:
            raise ValueError(f"layer {a['layer']!r}: bias does not fit int32")
        wq = self.const(a["layer"] + ".weight", w.astype(np.int8))
        wdq = self.node("DequantizeLinear", [wq, self.const("ws", s_eff), self.const("wz", zw.astype(np.int8))],
                        a["layer"] + ".weight_dq", axis=0)
        bs = (np.float32(a["input_scale"]) * s_eff).astype(np.float32)
        bq = self.const(a["layer"] + ".bias", bias.astype(np.int32))
        bdq = self.node("DequantizeLinear", [bq, self.const("bs", bs), self.const("bz", np.zeros_like(bias, np.int32))],
                        a["layer"] + ".bias_dq", axis=0)
        if op.kind == "conv":
            k = list(w.shape[2:])
            p = a["padding"]
            out = self.node("Conv", [xf, wdq, bdq], op.output, kernel_shape=k, strides=a["stride"],
                            pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"], group=a["groups"])
        else:
            out = self.node("Gemm", [xf, wdq, bdq], op.output, transB=1)
        self.kind[out] = ("f",)
        return out

    def op_requant(self, op: Op, x: str) -> str:
        xf = self.float_of(x, op.output + "_in")
        return self.quant(xf, op.attrs["grid"], op.attrs["lo"], op.attrs["hi"], op.output)

    def op_add(self, op: Op, *xs: str) -> str:
        fs = [self.float_of(x, op.output + f"_in{i}") for i, x in enumerate(xs)]
        s = self.node("Add", fs, op.output + "_sum")
        self.kind[s] = ("f",)
        return self.quant(s, op.attrs["grid"], op.attrs["lo"], op.attrs["hi"], op.output)

    def op_clamp(self, op: Op, x: str) -> str:
        k = self.kind[x]
        if k[0] == "q":
            dt = k[1]
            lo = self.const("lo", dt(int(op.tensors["lo"]))) if "lo" in op.tensors else ""
            hi = self.const("hi", dt(int(op.tensors["hi"]))) if "hi" in op.tensors else ""
            out = self.node("Clip", [x, lo, hi], op.output)
            self.kind[out] = k
            return out
        lo, hi = op.attrs.get("lo_real"), op.attrs.get("hi_real")
        if lo == 0.0 and hi is None:
            out = self.node("Relu", [x], op.output)
        else:
            lo_c = self.const("lo", np.float32(lo if lo is not None else -3.0e38))
            hi_c = self.const("hi", np.float32(hi if hi is not None else 3.0e38))
            out = self.node("Clip", [x, lo_c, hi_c], op.output)
        self.kind[out] = ("f",)
        return out

    def op_maxpool(self, op: Op, x: str) -> str:
        a = op.attrs
        p = a["padding"]
        out = self.node("MaxPool", [x], op.output, kernel_shape=a["kernel"], strides=a["stride"],
                        pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"])
        self.kind[out] = self.kind[x]
        return out

    def op_sumpool(self, op: Op, x: str) -> str:
        a = op.attrs
        xf = self.float_of(x, op.output + "_in")
        if a.get("global"):
            out = self.node("GlobalAveragePool", [xf], op.output)
        else:
            p = a["padding"]
            out = self.node("AveragePool", [xf], op.output, kernel_shape=a["kernel"], strides=a["stride"],
                            pads=[p[0], p[1], p[0], p[1]], count_include_pad=1)
        self.kind[out] = ("f",)
        return out

    def op_reshape(self, op: Op, x: str) -> str:
        out = self.node("Reshape", [x, self.const("shape", np.array([0] + list(op.attrs["shape"]), np.int64))],
                        op.output)
        self.kind[out] = self.kind[x]
        return out

    def op_getitem(self, op: Op, x: str) -> str:
        starts, ends, axes, steps = [], [], [], []
        for ax, s in enumerate(op.attrs["index"]):
            if not isinstance(s, list):
                raise ValueError(f"ONNX export supports slicing with slices only, got {op.attrs['index']}")
            if s == [None, None, None]:
                continue
            st = s[2] or 1
            starts.append(s[0] if s[0] is not None else (0 if st > 0 else -1))
            ends.append(s[1] if s[1] is not None else (2**62 if st > 0 else -(2**62)))
            axes.append(ax)
            steps.append(st)
        if not axes:
            self.kind[op.output] = self.kind[x]
            return x
        out = self.node("Slice", [x, self.const("st", np.array(starts, np.int64)),
                                  self.const("en", np.array(ends, np.int64)),
                                  self.const("ax", np.array(axes, np.int64)),
                                  self.const("sp", np.array(steps, np.int64))], op.output)
        self.kind[out] = self.kind[x]
        return out

    @staticmethod
    def onnx_pads(pad: list[int], nd: int = 4) -> list[int]:
        """ONNX ``Pad`` pads (all begins, then all ends) of a ``F.pad`` spec (last dimension first)."""
        begins, ends = [0] * nd, [0] * nd
        for i in range(len(pad) // 2):
            begins[nd - 1 - i] = pad[2 * i]
            ends[nd - 1 - i] = pad[2 * i + 1]
        return begins + ends

    def op_pad(self, op: Op, x: str) -> str:
        k = self.kind[x]
        val = k[1](op.attrs["value"]) if k[0] == "q" else np.float32(0.0)
        pads = np.array(self.onnx_pads(op.attrs["pad"]), np.int64)
        out = self.node("Pad", [x, self.const("pads", pads), self.const("v", val)],
                        op.output, mode="constant")
        self.kind[out] = k
        return out

    def op_dequantize(self, op: Op, x: str) -> str:
        return self.float_of(x, op.output)

    def _shape(self, value: str) -> list:
        """Symbolic output shape (batch ``N``, other dims unknown) of an engine value."""
        return ["N"] + [None] * (self.ndim.get(value, 2) - 1)

    def extra_output(self, v: str, key: str) -> str:
        """Graph value that exposes the codes of ``v`` (engine value ``key``) as an output."""
        return v

    def forced_input(self, name: str, v: str) -> str:
        """Graph value that feeds the forced codes of graph input ``name`` (replacing ``v``) to its consumers."""
        return name

    def code_offset(self, v: str) -> int:
        """Exported code minus engine code of value ``v`` (0: the codes travel unchanged)."""
        return 0

    def build(self, extra_outputs: dict[str, str] | None = None, forced: bool = False):
        TP, helper = self.TP, self.helper
        env = {self.im.input_name: "input"}
        self.kind["input"] = ("f",)
        shape = ["N"] + list(self.im.input_shape)
        inputs = [helper.make_tensor_value_info("input", TP.FLOAT, shape)]
        produced = {}
        offsets: dict[str, int] = {}
        force_keys = {k: p for p, k in (extra_outputs or {}).items()} if forced else {}
        for op in self.im.ops:
            args = [env[i] for i in op.inputs]
            fn = getattr(self, "op_linear" if op.kind in ("conv", "linear") else f"op_{op.kind}")
            env[op.output] = fn(op, *args)
            if op.output in force_keys:  # downstream reads the codes from a graph input instead
                v = env[op.output]
                produced[op.output] = v
                k = self.kind[v]
                name = "force:" + force_keys[op.output]
                dt = _TENSOR_TYPES[k[1]]
                inputs.append(helper.make_tensor_value_info(name, dt, self._shape(op.output)))
                self.kind[name] = k
                env[op.output] = self.forced_input(name, v)
                offsets[name] = self.code_offset(v)
        outputs = []
        for i, o in enumerate(self.im.output_names):
            name = "logits" if i == 0 else f"output{i}"
            self.nodes.append(helper.make_node("Identity", [env[o]], [name], name=f"{name}_identity"))
            outputs.append(helper.make_tensor_value_info(name, TP.FLOAT, self._shape(o)))
        out_names: dict[str, str] = {}
        exposed: dict[str, str] = {}
        for point, key in (extra_outputs or {}).items():
            v = produced.get(key, env[key])
            if v == "input" or v.startswith("force:"):
                out_names[point] = v
                continue
            if v not in exposed:
                ov = self.extra_output(v, key)
                dt = _TENSOR_TYPES[self.kind[v][1]]
                outputs.append(helper.make_tensor_value_info(ov, dt, self._shape(key)))
                exposed[v] = ov
                offsets[ov] = self.code_offset(v)
            out_names[point] = exposed[v]
        graph = helper.make_graph(self.nodes, "qcnn_integer", inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qcnn")
        model.ir_version = min(model.ir_version, 9)
        if any(offsets.values()):
            helper.set_model_props(model, {"qcnn.code_offsets": json.dumps({k: v for k, v in offsets.items() if v})})
        if len(opsets) == 1:
            self.onnx.checker.check_model(model)
        return model, out_names


_NCHW_TO_NHWC = {0: 0, 1: 3, 2: 1, 3: 2}  # axis of an NCHW tensor -> its axis in NHWC


class _QLinearBuilder(_Builder):
    """QOperator form for ONNX Runtime's CPU kernels: channels-last (NHWC) uint8 activations end to end.

    Every activation grid travels as uint8 codes (a signed grid is shifted by +128, zero point included, which
    represents the same real values), 4-D values in NHWC so that no ``Transpose`` runs between layers:

    * ``quantize``: ``QuantizeLinear`` (NCHW) then one uint8 ``Transpose`` to NHWC;
    * ``conv`` + its ``requant``: ``com.microsoft.QLinearConv(channels_last=1)`` (int8 per-channel weights with
      zero weight zero points, int32 bias ``round(b / (s_x s_w))``, requantization to the output grid);
    * ``add``: ``com.microsoft.QLinearAdd``; ``requant`` from codes (a ReLU'd residual sum rescaled to the grid
      of the next conv): ``com.microsoft.QLinearLeakyRelu(alpha=1)``, a 256-entry lookup table;
    * ``sumpool`` + its ``requant``: ``com.microsoft.QLinearGlobalAveragePool`` / ``QLinearAveragePool``
      (``channels_last=1``); ``maxpool``: ``com.microsoft.NhwcMaxPool``;
    * clamps narrower than the container (ReLU on a signed grid, ReLU6, grids under 8 bits): uint8 ``Clip``;
    * ``linear``: QDQ (``DequantizeLinear -> Gemm``), which ONNX Runtime fuses into ``com.microsoft.QGemm``.

    A graph this form cannot express (a conv whose accumulator feeds a float consumer, an unquantized residual
    operand, non-zero weight zero points) raises a ValueError; use the QDQ form for it."""

    MS = "com.microsoft"
    #: input channels of a (non-grouped) conv are zero-padded to a multiple of this (zero weights)
    CHANNEL_MULTIPLE = 4

    def __init__(self, im: IntegerModel):
        super().__init__(im)
        self.shapes = im.value_shapes()
        self.layout: dict[str, str] = {}
        self.shift: dict[str, int] = {}  # onnx value -> code offset (uint8 code = engine code + shift)
        self.pending: dict[str, tuple] = {}  # engine accumulator value -> (op, onnx input) awaiting its requant
        self.users: dict[str, int] = {}
        for op in im.ops:
            for i in op.inputs:
                self.users[i] = self.users.get(i, 0) + 1

    def _codes(self, out: str, grid: dict, layout: str) -> str:
        shift = 128 if grid["qmin"] < 0 else 0
        if grid["qmin"] + shift < 0 or grid["qmax"] + shift > 255:
            raise ValueError(f"{out}: a {grid['qmin']}..{grid['qmax']} grid does not fit 8 bits")
        self.kind[out] = ("q", np.uint8, grid["scale"], grid["zero_point"] + shift)
        self.shift[out] = shift
        self.layout[out] = layout
        return out

    def _sz(self, v: str) -> tuple[str, str]:
        _, _, s, z = self.kind[v]
        return self.const("s", np.float32(s)), self.const("z", np.uint8(z))

    def _grid_sz(self, grid: dict) -> tuple[str, str]:
        shift = 128 if grid["qmin"] < 0 else 0
        return self.const("s", np.float32(grid["scale"])), self.const("z", np.uint8(grid["zero_point"] + shift))

    def _clip(self, v: str, lo: int, hi: int, base: str) -> str:
        """Clamp the codes of ``v`` to engine codes [lo, hi] (no node when the container already does)."""
        sh = self.shift[v]
        lo_u, hi_u = max(lo + sh, 0), min(hi + sh, 255)
        if lo_u == 0 and hi_u == 255:
            return v
        out = self.node("Clip", [v, self.const("lo", np.uint8(lo_u)), self.const("hi", np.uint8(hi_u))], base)
        self.kind[out], self.shift[out], self.layout[out] = self.kind[v], sh, self.layout[v]
        return out

    def _axes(self, v: str) -> dict:
        return _NCHW_TO_NHWC if self.layout.get(v) == "nhwc" else {a: a for a in range(8)}

    def _to_nchw(self, v: str, base: str) -> str:
        if self.layout.get(v) != "nhwc":
            return v
        out = self.node("Transpose", [v], base + "_nchw", perm=[0, 3, 1, 2])
        self.kind[out], self.layout[out] = self.kind[v], "nchw"
        if v in self.shift:
            self.shift[out] = self.shift[v]
        return out

    # ops
    def op_quantize(self, op: Op, x: str) -> str:
        a = op.attrs
        x = self.input_clip(a, x)
        s, z = self._grid_sz(a["grid"])
        q = self._codes(self.node("QuantizeLinear", [x, s, z], op.output + "_nchw"), a["grid"], "nchw")
        q = self._clip(q, a["qmin"], a["qmax"], op.output + "_clip")
        if len(self.shapes[op.output]) != 4:
            return q
        out = self.node("Transpose", [q], op.output, perm=[0, 2, 3, 1])
        self.kind[out], self.shift[out], self.layout[out] = self.kind[q], self.shift[q], "nhwc"
        return out

    def op_linear(self, op: Op, x: str) -> str:
        if op.kind == "linear":
            return super().op_linear(op, self._to_nchw(x, op.output))
        if self.kind[x][0] != "q" or self.layout.get(x) != "nhwc":
            raise ValueError(f"conv {op.attrs['layer']!r}: its input is not NHWC codes")
        if self.users.get(op.output, 0) != 1:
            raise ValueError(f"conv {op.attrs['layer']!r}: the accumulator has {self.users.get(op.output, 0)} "
                             "consumers; the QLinear form needs exactly one requantization (use the QDQ form)")
        self.pending[op.output] = (op, x, [])
        self.kind[op.output] = ("acc",)
        return op.output

    def _conv(self, op: Op, x: str, rq: Op) -> str:
        a, t = op.attrs, op.tensors
        w = t["weight"].numpy().astype(np.int64) * t["sign"].numpy().astype(np.int64).reshape(-1, 1, 1, 1)
        if bool((t["weight_zero_point"].numpy() != 0).any()):
            raise ValueError(f"conv {a['layer']!r}: non-zero weight zero points (asymmetric weights); ONNX "
                             "Runtime's QLinearConv needs symmetric int8 weights, use the QDQ form")
        if w.min() < -128 or w.max() > 127:
            raise ValueError(f"conv {a['layer']!r}: weights need more than 8 bits")
        s_eff = (t["acc_scale"].numpy() / a["input_scale"]).astype(np.float32)
        bias = np.round(t["bias_real"].numpy() / (a["input_scale"] * s_eff.astype(np.float64)))
        if np.abs(bias).max(initial=0) >= 2**31:
            raise ValueError(f"conv {a['layer']!r}: bias does not fit int32")
        xs, xz = self._sz(x)
        k = self.CHANNEL_MULTIPLE
        if a["groups"] == 1 and w.shape[1] % k:  # e.g. an RGB stem: MLAS's u8s8 kernels run faster on 4k channels
            extra = k - w.shape[1] % k
            w = np.concatenate([w, np.zeros((w.shape[0], extra) + w.shape[2:], w.dtype)], axis=1)
            pads = self.const("pads", np.array([0, 0, 0, 0, 0, 0, 0, extra], np.int64))
            x = self.node("Pad", [x, pads, xz], op.output + "_pad4", mode="constant")  # zero weights there
        ys, yz = self._grid_sz(rq.attrs["grid"])
        p = a["padding"]
        out = self.node("QLinearConv", [x, xs, xz, self.const(a["layer"] + ".weight", w.astype(np.int8)),
                                        self.const("ws", s_eff), self.const("wz", np.zeros(len(s_eff), np.int8)),
                                        ys, yz, self.const(a["layer"] + ".bias", bias.astype(np.int32))],
                        rq.output + "_conv", domain=self.MS, channels_last=1, kernel_shape=list(w.shape[2:]),
                        strides=a["stride"], pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"],
                        group=a["groups"])
        return out

    def _pool(self, op: Op, x: str, rq: Op) -> str:
        a = op.attrs
        xs, xz = self._sz(x)
        ys, yz = self._grid_sz(rq.attrs["grid"])
        if a.get("global"):
            return self.node("QLinearGlobalAveragePool", [x, xs, xz, ys, yz], rq.output + "_pool", domain=self.MS,
                             channels_last=1)
        p = a["padding"]
        return self.node("QLinearAveragePool", [x, xs, xz, ys, yz], rq.output + "_pool", domain=self.MS,
                         channels_last=1, kernel_shape=a["kernel"], strides=a["stride"],
                         pads=[p[0], p[1], p[0], p[1]], count_include_pad=1)

    def op_requant(self, op: Op, x: str) -> str:
        g = op.attrs["grid"]
        if x in self.pending:
            src, xin, posts = self.pending[x]
            raw = self._conv(src, xin, op) if src.kind == "conv" else self._pool(src, xin, op)
            out = self._codes(raw, g, self.layout[xin])
            for post in posts:  # reshapes / max pools between the accumulator and its requantization
                out = getattr(self, f"op_{post.kind}")(post, out)
        elif self.kind[x][0] == "q":  # codes -> codes on another grid: a lookup table
            xs, xz = self._sz(x)
            ys, yz = self._grid_sz(g)
            out = self._codes(self.node("QLinearLeakyRelu", [x, xs, xz, ys, yz], op.output + "_lut",
                                        domain=self.MS, alpha=1.0), g, self.layout[x])
        elif self.kind[x][0] == "f" and self.ndim.get(op.inputs[0], 4) == 2:  # Gemm output (ORT fuses QGemm)
            s, z = self._grid_sz(g)
            out = self._codes(self.node("QuantizeLinear", [x, s, z], op.output + "_q"), g, "nchw")
        else:
            raise ValueError(f"{op.output}: requantizing a float accumulator is not expressible in the QLinear "
                             "form (quantize the tensor, or use the QDQ form)")
        return self._clip(out, op.attrs["lo"], op.attrs["hi"], op.output)

    def op_add(self, op: Op, *xs: str) -> str:
        if any(self.kind[x][0] != "q" for x in xs) or len({self.layout[x] for x in xs}) != 1:
            raise ValueError(f"add {op.attrs['layer']!r}: an operand is not quantized; quantize the conv outputs "
                             "that feed residual adds (add_residual_quantizers) or use the QDQ form")
        (sa, za), (sb, zb) = self._sz(xs[0]), self._sz(xs[1])
        ys, yz = self._grid_sz(op.attrs["grid"])
        out = self._codes(self.node("QLinearAdd", [xs[0], sa, za, xs[1], sb, zb, ys, yz], op.output + "_add",
                                    domain=self.MS), op.attrs["grid"], self.layout[xs[0]])
        return self._clip(out, op.attrs["lo"], op.attrs["hi"], op.output)

    def op_clamp(self, op: Op, x: str) -> str:
        if self.kind[x][0] != "q":
            raise ValueError(f"{op.output}: a clamp on a float accumulator is not expressible in the QLinear form")
        sh = self.shift[x]
        lo = int(op.tensors["lo"]) if "lo" in op.tensors else -sh
        hi = int(op.tensors["hi"]) if "hi" in op.tensors else 255 - sh
        return self._clip(x, lo, hi, op.output)

    def _defer(self, op: Op, x: str) -> str:
        """Apply ``op`` to the codes after the pending requantization of ``x`` (it commutes with it)."""
        src, xin, posts = self.pending.pop(x)
        if self.users.get(op.output, 0) != 1:
            raise ValueError(f"{op.output}: a deferred accumulator needs exactly one requantization")
        self.pending[op.output] = (src, xin, posts + [op])
        self.kind[op.output] = ("acc",)
        return op.output

    def op_maxpool(self, op: Op, x: str) -> str:
        if x in self.pending:  # requantization is monotone per channel: max pool of codes = codes of max pool
            return self._defer(op, x)
        if self.kind[x][0] != "q":
            raise ValueError(f"{op.output}: max pool of a float value is not expressible in the QLinear form")
        if self.layout.get(x) != "nhwc":
            return super().op_maxpool(op, x)
        a = op.attrs
        p = a["padding"]
        out = self.node("NhwcMaxPool", [x], op.output, domain=self.MS, kernel_shape=a["kernel"], strides=a["stride"],
                        pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"])
        self.kind[out], self.shift[out], self.layout[out] = self.kind[x], self.shift[x], "nhwc"
        return out

    def op_sumpool(self, op: Op, x: str) -> str:
        if self.kind[x][0] != "q" or self.layout.get(x) != "nhwc" or self.users.get(op.output, 0) != 1:
            raise ValueError(f"{op.output}: pooling of a float accumulator is not expressible in the QLinear form")
        self.pending[op.output] = (op, x, [])
        self.kind[op.output] = ("acc",)
        return op.output

    def _copy_meta(self, out: str, x: str, layout: str) -> str:
        self.kind[out], self.layout[out] = self.kind[x], layout
        if x in self.shift:
            self.shift[out] = self.shift[x]
        return out

    def op_reshape(self, op: Op, x: str) -> str:
        if x in self.pending:  # applied to the codes once the accumulator is requantized
            return self._defer(op, x)
        shp = self.shapes[op.inputs[0]]
        if self.layout.get(x) == "nhwc" and not (len(shp) == 4 and shp[2] == shp[3] == 1 and
                                                  len(op.attrs["shape"]) == 1):
            x = self._to_nchw(x, op.output)
        out = self.node("Reshape", [x, self.const("shape", np.array([0] + list(op.attrs["shape"]), np.int64))],
                        op.output)
        return self._copy_meta(out, x, "nchw")

    def op_getitem(self, op: Op, x: str) -> str:
        ax = self._axes(x)
        idx = list(op.attrs["index"])
        if len(idx) > 4 or any(not isinstance(s, list) for s in idx):
            raise ValueError(f"ONNX export supports slicing with slices only, got {op.attrs['index']}")
        permuted = [[None, None, None]] * 4
        for i, s in enumerate(idx):
            permuted[ax[i]] = s
        view = Op(op.kind, op.inputs, op.output, {"index": permuted})
        out = super().op_getitem(view, x)
        return self._copy_meta(out, x, self.layout.get(x, "nchw")) if out != x else x

    def op_pad(self, op: Op, x: str) -> str:
        pad, ax = op.attrs["pad"], self._axes(x)
        nd = 4
        begins, ends = [0] * nd, [0] * nd
        for i in range(len(pad) // 2):
            begins[ax[nd - 1 - i]] = pad[2 * i]
            ends[ax[nd - 1 - i]] = pad[2 * i + 1]
        k = self.kind[x]
        val = np.uint8(op.attrs["value"] + self.shift[x]) if k[0] == "q" else np.float32(0.0)
        out = self.node("Pad", [x, self.const("pads", np.array(begins + ends, np.int64)), self.const("v", val)],
                        op.output, mode="constant")
        return self._copy_meta(out, x, self.layout.get(x, "nchw"))

    def op_dequantize(self, op: Op, x: str) -> str:
        return self.float_of(self._to_nchw(x, op.output), op.output)

    def extra_output(self, v: str, key: str) -> str:
        """Codes of ``v`` as an NCHW uint8 graph output (code offset in the model's metadata)."""
        return self._to_nchw(v, key + "_out")

    def code_offset(self, v: str) -> int:
        return self.shift.get(v, 0)

    def forced_input(self, name: str, v: str) -> str:
        if self.layout.get(v) != "nhwc":
            return name
        out = self.node("Transpose", [name], name.replace(":", "_") + "_nhwc", perm=[0, 2, 3, 1])
        return self._copy_meta(out, v, "nhwc")


FORMS = ("qdq", "qlinear", "integer")


def to_onnx(im: IntegerModel, path: str | Path | None = None, with_codes: bool = False, forced: bool = False,
            form: str = "qdq"):
    """ONNX model of ``im`` (an ``onnx.ModelProto``; written to ``path`` if given).

    ``form="qdq"`` (default): portable QDQ graph (opset 13) that any runtime can fuse. ``form="qlinear"``: the
    QOperator form for ONNX Runtime's CPU kernels (``com.microsoft`` QLinearConv/QLinearAdd, channels-last
    uint8 activations, no transposes between layers; see :class:`_QLinearBuilder`), the fastest on x86.
    ``form="integer"``: the engine's own integer arithmetic in standard operators (``ConvInteger``,
    ``MatMulInteger``, int64 requantization; :mod:`qcnn.integer.onnx_integer`), bit-exact with the engine.

    ``with_codes`` adds the codes of every quantizer point as extra graph outputs and returns
    ``(model, point -> output name)``. ``forced`` (with ``with_codes``) also makes every point's consumers read
    its codes from an extra graph input ``force:<point>`` (teacher forcing: each layer can then be checked on
    exactly the simulation's input codes). Use :func:`ort_codes` to run such a model: codes of the QLinear form
    are stored with an offset (signed grids as uint8)."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}: choose one of {FORMS}")
    if form == "integer":
        from qcnn.integer.onnx_integer import IntegerBuilder

        builder = IntegerBuilder(im)
    else:
        builder = _QLinearBuilder(im) if form == "qlinear" else _Builder(im)
    model, names = builder.build(im.points if with_codes else None, forced=forced and with_codes)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(path)
    return (model, names) if with_codes else model


def ort_codes(model, names: dict[str, str], x: torch.Tensor, force: dict[str, torch.Tensor] | None = None,
              threads: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run a ``with_codes`` export (``to_onnx(..., with_codes=True[, forced=True])``) in ONNX Runtime on ``x``;
    ``force`` gives the codes fed to the ``force:<point>`` inputs (engine codes, int64). Returns ``(logits, point
    -> engine codes as int64)``."""
    props = {p.key: p.value for p in model.metadata_props}
    offsets = json.loads(props.get("qcnn.code_offsets", "{}"))
    ort = OrtModel(model, threads=threads)
    feeds = {"input": x.detach().cpu().float().numpy()}
    for i in ort.session.get_inputs():
        if i.name.startswith("force:"):
            if force is None or i.name[6:] not in force:
                raise ValueError(f"the model reads forced codes for {i.name[6:]!r}; pass them in force")
            dt = np.uint8 if "uint8" in i.type else np.int64 if "int64" in i.type else np.int8
            feeds[i.name] = (force[i.name[6:]].cpu().numpy() + offsets.get(i.name, 0)).astype(dt)
    outs = ort.session.run(None, feeds)
    got = {p: torch.from_numpy(outs[ort.output_names.index(n)].astype(np.int64) - offsets.get(n, 0))
           for p, n in names.items() if n in ort.output_names}
    return torch.from_numpy(outs[0]), got


class OrtModel:
    """ONNX Runtime session on an exported model (all graph optimisations on, CPU by default)."""

    def __init__(self, model, threads: int | None = None, providers: list[str] | None = None,
                 optimized_path: str | Path | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        self.session = ort.InferenceSession(data, so, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        return self.session.run(None, {self.input_name: arr})

    def __call__(self, x) -> torch.Tensor:
        return torch.from_numpy(self.run(x)[0])


def optimized_op_counts(model, threads: int | None = None) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    import tempfile

    import onnx

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "optimized.onnx"
        OrtModel(model, threads=threads, optimized_path=p)
        g = onnx.load(str(p)).graph
    counts: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["FORMS", "OPSET", "OrtModel", "optimized_op_counts", "ort_codes", "to_onnx"]

"""The QDQ ONNX form of an :class:`~qcnn.integer.runtime.IntegerModel` (``to_onnx(..., form="qdq")``, default).

Portable, opset 13, built with ``onnx.helper`` directly from the compiled integer model, so what is exported is
exactly the integer model (same grids, int8 weights, int32 biases): activations travel between layers as
int8/uint8 codes, ``QuantizeLinear`` / ``DequantizeLinear`` carry each grid's scale and zero point, weights
are int8 initializers with per-channel ``DequantizeLinear(axis=0)``, biases are int32 with scale ``s_x s_w``.
ONNX Runtime's graph optimiser fuses ``DQ -> Conv -> Q`` into ``QLinearConv``, ``DQ -> Add -> Q`` into
``QLinearAdd``, ``DQ -> Gemm -> Q`` into ``QGemm``, etc. (see :func:`~qcnn.integer.onnx_runtime.optimized_op_counts`),
but it keeps the graph NCHW and wraps its NHWC int8 kernels in ``Transpose`` nodes wherever a neighbour is not
fused. Mapping of the integer operations:

* ``quantize`` -> ``QuantizeLinear`` (a float ``Clip`` first for grids narrower than the 8-bit container);
* ``conv`` / ``linear`` -> ``DequantizeLinear(x)``, ``Conv`` / ``Gemm`` with ``DequantizeLinear`` weights and
  bias (a BatchNorm folded by the engine is folded into the per-channel weight scale; a negative BN scale
  negates the weight codes);
* ``requant`` -> optional ``Relu`` / ``Clip`` then ``QuantizeLinear`` (from codes: ``DequantizeLinear`` first);
* ``add`` -> ``DequantizeLinear`` of code operands, ``Add``, ``QuantizeLinear``;
* ``concat`` / ``permute`` -> ``Concat`` / ``Transpose`` of codes; ``lut`` -> ``Gather`` from the table (codes to
  codes); ``mul`` -> ``DequantizeLinear`` of both operands, ``Mul`` (its ``requant``: ``QuantizeLinear``);
  ``affine`` (a BatchNorm on codes) -> ``DequantizeLinear``, ``Mul``, ``Add``;
* ``clamp`` on codes -> ``Clip`` on the int8/uint8 tensor; ``maxpool`` -> ``MaxPool`` (on codes directly);
  ``sumpool`` -> ``AveragePool`` / ``GlobalAveragePool``; ``reshape`` / ``getitem`` / ``pad`` ->
  ``Reshape`` / ``Slice`` / ``Pad``; ``dequantize`` -> ``DequantizeLinear``.

ONNX Runtime adds the bias in accumulator units (int32, as Jacob et al.) and requantizes in float32, so its
codes can differ from the simulation by one LSB where the value is near a rounding tie; with
:func:`qcnn.integer.add_bias_quantizers` the simulation uses the same int32 bias and only float ties remain.
"""

from __future__ import annotations

import numpy as np

from qcnn.integer.ir import Op
from qcnn.integer.onnx_builder import GraphBuilder, as_uint8, container, onnx_pads


class QDQBuilder(GraphBuilder):
    """Builds the QDQ form: values are float32 (``("f",)``) or 8-bit codes (``("q", dtype, scale, zp)``)."""

    #: weights as int8 (the portable QDQ convention, symmetric weights with zero points 0) or as uint8 shifted by
    #: 128 (the QLinear form: ONNX Runtime's uint8 x int8 kernels saturate on AVX2 CPUs without VNNI)
    UINT8_WEIGHTS = False

    def input_clip(self, a: dict, x: str) -> str:
        """The float input clipped to the quantize op's real range, where it has one."""
        if a.get("lo_real") is None and a.get("hi_real") is None:
            return x
        lo = np.float32(a["lo_real"] if a.get("lo_real") is not None else -3.0e38)
        hi = np.float32(a["hi_real"] if a.get("hi_real") is not None else 3.0e38)
        return self.node("Clip", [x, self.const("lo", lo), self.const("hi", hi)], "input_clip")

    def quant(self, x: str, grid: dict, lo: int, hi: int, base: str) -> str:
        """Float ``x`` -> codes on ``grid`` clamped to [lo, hi] (float Clip where the container is wider)."""
        dt = container(grid["qmin"], grid["qmax"], base)
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
        cast = as_uint8 if self.UINT8_WEIGHTS else (lambda v: v.astype(np.int8))
        wq = self.const(a["layer"] + ".weight", cast(w))
        wdq = self.node("DequantizeLinear", [wq, self.const("ws", s_eff), self.const("wz", cast(zw))],
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
                        pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"], ceil_mode=int(a.get("ceil_mode", 0)))
        self.kind[out] = self.kind[x]
        return out

    def op_concat(self, op: Op, *xs: str) -> str:
        if len({self.kind[x] for x in xs}) != 1:
            raise ValueError(f"concatenation {op.attrs['layer']!r}: its operands are not codes on one grid")
        out = self.node("Concat", list(xs), op.output, axis=op.attrs["dim"])
        self.kind[out] = self.kind[xs[0]]
        return out

    def op_mul(self, op: Op, a: str, b: str) -> str:
        out = self.node("Mul", [self.float_of(a, op.output + "_a"), self.float_of(b, op.output + "_b")], op.output)
        self.kind[out] = ("f",)
        return out

    def op_affine(self, op: Op, x: str) -> str:
        """The real value ``f v + b`` of a BatchNorm on codes, in float32 (``Mul``, ``Add``)."""
        t, nd = op.tensors, self.ndim.get(op.output, 4)
        shape = [1, -1] + [1] * (nd - 2)
        f = (t["sign"].numpy() * t["acc_scale"].numpy() / op.attrs["input_scale"]).astype(np.float32).reshape(shape)
        y = self.node("Mul", [self.float_of(x, op.output + "_x"), self.const("f", f)], op.output + "_mul")
        out = self.node("Add", [y, self.const("b", t["bias_real"].numpy().astype(np.float32).reshape(shape))],
                        op.output)
        self.kind[out] = ("f",)
        return out

    def op_lut(self, op: Op, x: str) -> str:
        """Codes -> codes through the table (``Gather``: exact, as the engine)."""
        g = op.attrs["grid"]
        dt = container(g["qmin"], g["qmax"], op.output)
        idx = self.node("Cast", [x], op.output + "_i64", to=self.TP.INT64)
        if op.attrs["input_qmin"]:
            idx = self.node("Sub", [idx, self.const("qmin", np.int64(op.attrs["input_qmin"]))], op.output + "_idx")
        out = self.node("Gather", [self.const("table", op.tensors["table"].numpy().astype(dt)), idx], op.output,
                        axis=0)
        self.kind[out] = ("q", dt, g["scale"], g["zero_point"])
        return out

    def op_permute(self, op: Op, x: str) -> str:
        out = self.node("Transpose", [x], op.output, perm=op.attrs["dims"])
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

    def op_pad(self, op: Op, x: str) -> str:
        k = self.kind[x]
        val = k[1](op.attrs["value"]) if k[0] == "q" else np.float32(0.0)
        pads = np.array(onnx_pads(op.attrs["pad"]), np.int64)
        out = self.node("Pad", [x, self.const("pads", pads), self.const("v", val)],
                        op.output, mode="constant")
        self.kind[out] = k
        return out

    def op_dequantize(self, op: Op, x: str) -> str:
        return self.float_of(x, op.output)


__all__ = ["QDQBuilder"]

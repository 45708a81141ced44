"""The integer ONNX form: the engine's own arithmetic in standard ONNX integer operators (``form="integer"``).

QDQ and QLinear graphs let ONNX Runtime requantize in float32 (``acc * fl32(s_x s_w / s_y)``, ties to even),
so near a rounding tie its codes can differ from the simulation by one LSB, and such flips spread with depth.
This form keeps every value an integer from the quantized input to the dequantized logits and spells out
the engine's int64 requantization (:func:`qcnn.integer.requant.wide_requantize`), so ONNX Runtime computes
the same codes as :class:`~qcnn.integer.runtime.IntegerModel` with ``requant="int64"`` bit for bit:

* ``quantize``: ``Cast(double)``, ``Mul(fl32(1/s))``, ``Round`` (ties to even), ``Cast(int64)``, ``+ z``,
  ``Clip`` — the engine's quantize op;
* ``conv`` / ``linear``: ``ConvInteger`` / ``MatMulInteger`` on the 8-bit codes (int8 weights, the BatchNorm
  sign folded into them) giving exact int32 accumulators; per-channel weight zero points (asymmetric FQN
  weights), which ``ConvInteger`` does not take, by the FQN expansion ``sum x (w - z_w) = sum x w - z_w sum x``
  with ``sum x`` from a ``ConvInteger`` with an all-ones kernel; the int32 bias of ``bias_mode="accumulator"``;
* ``requant`` / ``add``: ``Mul`` by the int32 multipliers ``K_i`` on int64, ``Mul`` by ``2^l_i``, ``Add`` of the
  offset, then the engine's rounding shift with ties to even: ``r = Mod(t, 2^n)``, ``f = Div(t - r, 2^n)``
  (exact), ``f + (r > 2^(n-1)) + (r == 2^(n-1)) Mod(f, 2)``, ``+ z``, ``Clip``;
* ``clamp``: ``Mul`` by ``2^k``, ``Add``, ``Max`` / ``Min``; ``maxpool``: ``MaxPool`` on a float64 copy (every
  value is an integer below 2^53, exact); ``sumpool``: ``ReduceSum`` (global) or a sum of strided ``Slice``
  views (windows); ``reshape`` / ``getitem`` / ``pad`` / ``permute`` / ``concat``: ``Reshape`` / ``Slice`` /
  ``Pad`` / ``Transpose`` / ``Concat`` on int64; ``mul``: ``Sub`` of the zero points, ``Mul``; ``affine``
  (a BatchNorm on codes): ``Sub``, ``Mul`` by the sign; ``lut``: ``Gather`` from the table;
* ``dequantize``: ``Cast(double)``, ``(q - z) s (+ offset)``, ``Cast(float)``.

It needs the ``requant="int64"`` scheme and weights / activation grids of at most 8 bits. It is slower than
the QLinear form (elementwise int64 operators between the integer convolutions); it is the form to check
that a runtime reproduces the model exactly.
"""

from __future__ import annotations

import numpy as np

from qcnn.integer.ir import Op, operand_tensors, operand_zero_points
from qcnn.integer.onnx_builder import GraphBuilder, as_uint8, container, onnx_pads
from qcnn.integer.runtime import IntegerModel
from qcnn.integer.schemes import Int64Scheme, get_scheme, scheme_of


class IntegerBuilder(GraphBuilder):
    """Builds the integer form: values are int64 tensors (``kind`` ``("q", np.int64, s, z, (lo, hi))`` for codes
    in ``[lo, hi]``, ``("a", np.int64)`` for accumulators), the network input and output float32. Reshapes,
    slices, pads, max pools and ReLU clamps on codes keep their input's kind."""

    def __init__(self, im: IntegerModel):
        if not isinstance(get_scheme(im.meta.get("requant", "int32")), Int64Scheme):
            raise ValueError("the integer ONNX form spells out the int64 requantization: compile with "
                             "to_integer(..., requant='int64') (the default)")
        super().__init__(im)

    def i64(self, base: str, arr) -> str:
        return self.const(base, np.asarray(arr, dtype=np.int64))

    def _bcast(self, t, ndim: int) -> np.ndarray:
        """A per-channel tensor (shape (1, C, 1, 1) or (C,)) or scalar as an int64 array broadcasting over
        an ``ndim``-dimensional value."""
        a = np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype=np.int64)
        if a.size == 1:
            return a.reshape(())
        if a.ndim == ndim:
            return a
        if a.ndim == ndim - 1:
            return a[None]
        return a.reshape([1, -1] + [1] * (ndim - 2))

    def _codes(self, out: str, grid: dict | None = None, rng: tuple[int, int] | None = None) -> str:
        self.kind[out] = ("q", np.int64, grid["scale"], grid["zero_point"], rng) if grid else ("a", np.int64)
        return out

    def _round_shift(self, t: str, n, ndim: int, base: str) -> str:
        """``round(t / 2^n)``, ties to even (the engine's ``rounding_divide_by_pot_even``; ``n`` >= 0, per
        channel) with opset-13 integer operators: ``r = Mod(t, 2^n)`` (in ``[0, 2^n)``), ``f = (t - r) / 2^n``
        (exact), ``f + (r > h) + (r == h) Mod(f, 2)`` with ``h = 2^(n-1)`` (``h = 1`` where ``n = 0``: no tie)."""
        n = self._bcast(n, ndim)
        half = np.left_shift(np.int64(1), np.maximum(n - 1, 0)).astype(np.int64)
        div = np.left_shift(np.int64(1), n).astype(np.int64)
        pot, h = self.i64("pot", div), self.i64("half", half)
        r = self.node("Mod", [t, pot], base + "_rem", fmod=0)
        f = self.node("Div", [self.node("Sub", [t, r], base + "_down"), pot], base + "_floor")
        above = self.node("Cast", [self.node("Greater", [r, h], base + "_gt")], base + "_up", to=self.TP.INT64)
        tie = self.node("Cast", [self.node("Equal", [r, h], base + "_eq")], base + "_tie", to=self.TP.INT64)
        odd = self.node("Mod", [f, self.i64("two", np.int64(2))], base + "_odd", fmod=0)
        up = self.node("Add", [above, self.node("Mul", [tie, odd], base + "_tieodd")], base + "_inc")
        return self.node("Add", [f, up], base + "_round")

    def _finish(self, t: str, a: dict, base: str) -> str:
        t = self.node("Add", [t, self.i64("z", a["zero_point"])], base + "_zp") if a["zero_point"] else t
        return self.node("Clip", [t, self.i64("lo", a["lo"]), self.i64("hi", a["hi"])], base)

    # ops
    def op_quantize(self, op: Op, x: str) -> str:
        a = op.attrs
        xd = self.node("Cast", [x], op.output + "_f64", to=self.TP.DOUBLE)
        if a.get("lo_real") is not None or a.get("hi_real") is not None:
            lo = np.float64(a["lo_real"] if a.get("lo_real") is not None else -1e300)
            hi = np.float64(a["hi_real"] if a.get("hi_real") is not None else 1e300)
            xd = self.node("Clip", [xd, self.const("lo", lo), self.const("hi", hi)], op.output + "_clip")
        r = self.node("Round", [self.node("Mul", [xd, self.const("inv", np.float64(a["inv_scale"]))],
                                          op.output + "_mul")], op.output + "_round")
        q = self.node("Cast", [r], op.output + "_i64", to=self.TP.INT64)
        out = self._finish(q, {"zero_point": a["zero_point"], "lo": a["qmin"], "hi": a["qmax"]}, op.output)
        return self._codes(out, a["grid"], (a["qmin"], a["qmax"]))

    def op_linear(self, op: Op, x: str) -> str:
        a, t = op.attrs, op.tensors
        w = t["weight"].numpy().astype(np.int64)
        zw = t["weight_zero_point"].numpy().astype(np.int64)
        sign = t["sign"].numpy().astype(np.int64)
        shape = [-1] + [1] * (w.ndim - 1)
        w, zw = w * sign.reshape(shape), zw * sign
        if w.min() < -128 or w.max() > 127:
            raise ValueError(f"layer {a['layer']!r}: weights need more than 8 bits (or a negative BatchNorm scale "
                             "negates a -128 code); the integer ONNX form needs int8 weights")
        centred = w - zw.reshape(shape)
        direct = centred.min() >= -128 and centred.max() <= 127  # zero points folded into the int8 weights
        wq = (centred if direct else w).astype(np.int8)
        xz = a["input_zero_point"]
        k = self.kind[x]
        if k[0] != "q":
            raise ValueError(f"layer {a['layer']!r} reads an accumulator, not codes")
        dt = container(*k[4], a["layer"])
        # both operands as uint8 (signed codes and weights shifted by 128, their zero points too): ONNX Runtime's
        # uint8 x int8 kernels on AVX2 CPUs without VNNI add pairs of products in saturating int16 (up to
        # 2 * 255 * 128 > 32767: measured wrong logits), its uint8 x uint8 kernels widen to int32 first
        if dt is np.uint8:
            xc = self.node("Cast", [x], op.output + "_x8", to=self.TP.UINT8)
        else:
            x64 = self.node("Cast", [x], op.output + "_x64s", to=self.TP.INT64)
            xc = self.node("Cast", [self.node("Add", [x64, self.i64("s128", 128)], op.output + "_xs")],
                           op.output + "_x8", to=self.TP.UINT8)
            xz = xz + 128
        xzc = self.const("xz", np.uint8(xz))
        wu = as_uint8(wq)
        wz = self.const("wz", as_uint8(0))
        if op.kind == "conv":
            p = a["padding"]
            conv = dict(kernel_shape=list(w.shape[2:]), strides=a["stride"], pads=[p[0], p[1], p[0], p[1]],
                        dilations=a["dilation"], group=a["groups"])
            wc = self.const(a["layer"] + ".weight", wu)
            acc = self.node("ConvInteger", [xc, wc, xzc, wz], op.output + "_conv", **conv)
        else:
            acc = self.node("MatMulInteger", [xc, self.const(a["layer"] + ".weight", np.ascontiguousarray(wu.T)), xzc,
                                              wz], op.output + "_mm")
        acc = self.node("Cast", [acc], op.output + "_acc", to=self.TP.INT64)
        if not direct:  # sum x (w - z_w) = sum x w - z_w sum x
            if op.kind == "conv":
                g = a["groups"]
                ones = np.ones((g, w.shape[1]) + tuple(w.shape[2:]), np.uint8)
                sx = self.node("ConvInteger", [xc, self.const("ones", ones), xzc, self.const("wz0", np.uint8(0))],
                               op.output + "_sumx", **conv)
                sx = self.node("Cast", [sx], op.output + "_sumx64", to=self.TP.INT64)
                if g > 1:
                    idx = np.arange(w.shape[0]) // (w.shape[0] // g)
                    sx = self.node("Gather", [sx, self.i64("grp", idx)], op.output + "_sumxg", axis=1)
                zb = zw.reshape(1, -1, 1, 1)
            else:
                sx = self.node("ReduceSum", [self.node("Sub", [self.node("Cast", [xc], op.output + "_x64",
                                                                         to=self.TP.INT64), self.i64("xz", xz)],
                                                       op.output + "_xc"), self.i64("ax", [1])],
                               op.output + "_sumx", keepdims=1)
                zb = zw.reshape(1, -1)
            acc = self.node("Sub", [acc, self.node("Mul", [sx, self.i64("zw", zb)], op.output + "_zwsx")],
                            op.output + "_centred")
        bias = t["bias"].numpy().astype(np.int64)
        if np.any(bias):
            shape = [1, -1] + [1] * (w.ndim - 2) if op.kind == "conv" else [1, -1]
            acc = self.node("Add", [acc, self.i64("bias", bias.reshape(shape))], op.output + "_bias")
        return self._codes(acc)

    def _wide(self, op: Op, xs: list[str]) -> str:
        """A ``requant`` / ``add`` of the int64 scheme: ``RDBPOT(sum_i ((x_i - z_i) K_i) 2^l_i + offset, n)``."""
        if not isinstance(scheme_of(op), Int64Scheme):
            raise ValueError(f"{op.output}: not an int64 requantization")
        a, t = op.attrs, op.tensors
        ndim = self.ndim.get(op.output, 4)
        ks, ls = operand_tensors(op, "multiplier"), operand_tensors(op, "lshift")
        total = None
        for i, (x, z) in enumerate(zip(xs, operand_zero_points(op))):
            if z:
                x = self.node("Sub", [x, self.i64("z", z)], op.output + f"_c{i}")
            term = self.node("Mul", [x, self.i64("k", self._bcast(ks[i], ndim))], op.output + f"_k{i}")
            if ls is not None and np.any(ls[i].numpy()):
                pot = np.left_shift(np.int64(1), self._bcast(ls[i], ndim)).astype(np.int64)
                term = self.node("Mul", [term, self.i64("l", pot)], op.output + f"_l{i}")
            total = term if total is None else self.node("Add", [total, term], op.output + f"_sum{i}")
        if np.any(t["offset"].numpy()):
            total = self.node("Add", [total, self.i64("off", self._bcast(t["offset"], ndim))], op.output + "_off")
        y = self._round_shift(total, t["rshift"], ndim, op.output)
        out = self._finish(y, a, op.output)
        return self._codes(out, a["grid"], (a["lo"], a["hi"]))

    def op_requant(self, op: Op, x: str) -> str:
        return self._wide(op, [x])

    def op_add(self, op: Op, *xs: str) -> str:
        return self._wide(op, list(xs))

    def op_clamp(self, op: Op, x: str) -> str:
        t = op.tensors
        ndim = self.ndim.get(op.output, 4)
        kind = self.kind[x]  # codes stay codes (a ReLU on a grid holding 0)
        if "pre_shift" in t:
            x = self.node("Mul", [x, self.i64("pot", np.left_shift(np.int64(1), int(t["pre_shift"])))],
                          op.output + "_shift")
        if "add" in t:
            x = self.node("Add", [x, self.i64("add", self._bcast(t["add"], ndim))], op.output + "_add")
        if "lo" in t:
            x = self.node("Max", [x, self.i64("lo", self._bcast(t["lo"], ndim))], op.output + "_lo")
        if "hi" in t:
            x = self.node("Min", [x, self.i64("hi", self._bcast(t["hi"], ndim))], op.output + "_hi")
        out = self.node("Identity", [x], op.output)
        self.kind[out] = kind if not ("pre_shift" in t or "add" in t) else ("a", np.int64)
        return out

    def op_maxpool(self, op: Op, x: str) -> str:
        a = op.attrs
        p = a["padding"]
        xd = self.node("Cast", [x], op.output + "_f64", to=self.TP.DOUBLE)
        m = self.node("MaxPool", [xd], op.output + "_pool", kernel_shape=a["kernel"], strides=a["stride"],
                      pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"], ceil_mode=int(a.get("ceil_mode", 0)))
        out = self.node("Cast", [m], op.output, to=self.TP.INT64)
        self.kind[out] = self.kind[x]
        return out

    def op_sumpool(self, op: Op, x: str) -> str:
        a = op.attrs
        if a.get("input_zero_point"):
            x = self.node("Sub", [x, self.i64("z", a["input_zero_point"])], op.output + "_c")
        if a.get("global"):
            return self._codes(self.node("ReduceSum", [x, self.i64("axes", [2, 3])], op.output, keepdims=1))
        p, k, s = a["padding"], a["kernel"], a["stride"]
        if p[0] or p[1]:
            x = self.node("Pad", [x, self.i64("pads", [0, 0, p[0], p[1], 0, 0, p[0], p[1]]), self.i64("v", 0)],
                          op.output + "_pad", mode="constant")
        shape = self.shapes[op.inputs[0]]
        h, w = shape[-2] + 2 * p[0], shape[-1] + 2 * p[1]
        ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
        total = None
        for i in range(k[0]):
            for j in range(k[1]):
                sl = self.node("Slice", [x, self.i64("st", [i, j]), self.i64("en", [i + s[0] * (ho - 1) + 1,
                                                                                   j + s[1] * (wo - 1) + 1]),
                                         self.i64("ax", [2, 3]), self.i64("sp", s)], op.output + f"_tap{i}{j}")
                total = sl if total is None else self.node("Add", [total, sl], op.output + f"_acc{i}{j}")
        return self._codes(self.node("Identity", [total], op.output))

    def op_pad(self, op: Op, x: str) -> str:
        out = self.node("Pad", [x, self.i64("pads", onnx_pads(op.attrs["pad"])), self.i64("v", op.attrs["value"])],
                        op.output, mode="constant")
        self.kind[out] = self.kind[x]
        return out

    def op_concat(self, op: Op, *xs: str) -> str:
        g = op.attrs["grid"]
        out = self.node("Concat", list(xs), op.output, axis=op.attrs["dim"])
        return self._codes(out, g, (g["qmin"], g["qmax"]))

    def op_mul(self, op: Op, a: str, b: str) -> str:
        xs = []
        for i, (x, z) in enumerate(zip((a, b), op.attrs["input_zero_points"])):
            xs.append(self.node("Sub", [x, self.i64("z", z)], op.output + f"_c{i}") if z else x)
        return self._codes(self.node("Mul", xs, op.output))

    def op_affine(self, op: Op, x: str) -> str:
        z = op.attrs["input_zero_point"]
        x = self.node("Sub", [x, self.i64("z", z)], op.output + "_c") if z else x
        sign = self._bcast(op.tensors["sign"], self.ndim.get(op.output, 4))
        return self._codes(self.node("Mul", [x, self.i64("sign", sign)], op.output))

    def op_lut(self, op: Op, x: str) -> str:
        g = op.attrs["grid"]
        if op.attrs["input_qmin"]:
            x = self.node("Sub", [x, self.i64("qmin", op.attrs["input_qmin"])], op.output + "_idx")
        out = self.node("Gather", [self.i64("table", op.tensors["table"].numpy()), x], op.output, axis=0)
        return self._codes(out, g, (g["qmin"], g["qmax"]))

    def op_permute(self, op: Op, x: str) -> str:
        out = self.node("Transpose", [x], op.output, perm=op.attrs["dims"])
        self.kind[out] = self.kind[x]
        return out

    def op_dequantize(self, op: Op, x: str) -> str:
        t = op.tensors
        if op.attrs.get("zero_point"):
            x = self.node("Sub", [x, self.i64("z", op.attrs["zero_point"])], op.output + "_c")
        xd = self.node("Cast", [x], op.output + "_f64", to=self.TP.DOUBLE)
        s = t["scale"].numpy().astype(np.float64)
        s = s.reshape([1] + list(s.shape)) if s.ndim else s
        y = self.node("Mul", [xd, self.const("s", s)], op.output + "_mul")
        if "offset" in t:
            o = t["offset"].numpy().astype(np.float64)
            y = self.node("Add", [y, self.const("o", o.reshape([1] + list(o.shape)) if o.ndim else o)],
                          op.output + "_off")
        out = self.node("Cast", [y], op.output, to=self.TP.FLOAT)
        self.kind[out] = ("f",)
        return out


__all__ = ["IntegerBuilder"]

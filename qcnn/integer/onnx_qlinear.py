"""The QLinear ONNX form (``to_onnx(..., form="qlinear")``): ONNX Runtime's channels-last int8 CPU kernels.

The QOperator form for ONNX Runtime's CPU execution provider: ``com.microsoft`` QLinearConv
(``channels_last=1``) / QLinearAdd / QLinearGlobalAveragePool on uint8 codes in NHWC from the first layer to
the last, one ``Transpose`` (of the uint8 input codes) in the whole graph. It is built on the QDQ form
(:mod:`qcnn.integer.onnx_qdq`): the classifier (``linear``) and NCHW max pools are emitted as QDQ, which
ONNX Runtime fuses (``QGemm``).
"""

from __future__ import annotations

import numpy as np

from qcnn.integer.ir import Op
from qcnn.integer.onnx_builder import as_uint8
from qcnn.integer.onnx_qdq import QDQBuilder
from qcnn.integer.runtime import IntegerModel

_NCHW_TO_NHWC = {0: 0, 1: 3, 2: 1, 3: 2}  # axis of an NCHW tensor -> its axis in NHWC


class QLinearBuilder(QDQBuilder):
    """QOperator form for ONNX Runtime's CPU kernels: channels-last (NHWC) uint8 activations end to end.

    Every activation grid travels as uint8 codes (a signed grid is shifted by +128, zero point included, which
    represents the same real values), 4-D values in NHWC so that no ``Transpose`` runs between layers:

    * ``quantize``: ``QuantizeLinear`` (NCHW) then one uint8 ``Transpose`` to NHWC;
    * ``conv`` + its ``requant``: ``com.microsoft.QLinearConv(channels_last=1)`` (symmetric per-channel weights
      stored as uint8 with zero point 128, which ONNX Runtime runs exactly on x86 CPUs without VNNI, see
      :mod:`qcnn.integer.cpu`; int32 bias ``round(b / (s_x s_w))``, requantization to the output grid);
    * ``add``: ``com.microsoft.QLinearAdd``; ``requant`` from codes (a ReLU'd residual sum rescaled to the grid
      of the next conv): ``com.microsoft.QLinearLeakyRelu(alpha=1)``, a 256-entry lookup table;
    * ``sumpool`` + its ``requant``: ``com.microsoft.QLinearGlobalAveragePool`` / ``QLinearAveragePool``
      (``channels_last=1``); ``maxpool``: ``com.microsoft.NhwcMaxPool``;
    * clamps narrower than the container (ReLU on a signed grid, ReLU6, grids under 8 bits): uint8 ``Clip``;
    * ``linear``: QDQ (``DequantizeLinear -> Gemm``), which ONNX Runtime fuses into ``com.microsoft.QGemm``; a
      conv whose accumulator is the network's output (a detection head): QDQ too (``DequantizeLinear -> Conv``).

    A graph this form cannot express (a conv whose accumulator feeds a float consumer, an unquantized residual
    operand, non-zero weight zero points) raises a ValueError; use the QDQ form for it."""

    MS = "com.microsoft"
    UINT8_WEIGHTS = True  # the classifier's QDQ Gemm (fused to QGemm) too
    #: input channels of a (non-grouped) conv are zero-padded to a multiple of this (zero weights)
    CHANNEL_MULTIPLE = 4

    def __init__(self, im: IntegerModel):
        super().__init__(im)
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
        # weights as uint8 shifted by 128 (zero point 128 on every channel, the same real values): ONNX Runtime's
        # uint8 x int8 kernels on AVX2 CPUs without VNNI add pairs of products in saturating int16 (measured: codes
        # 60 LSB off), its uint8 x uint8 kernels widen to int32 first
        out = self.node("QLinearConv", [x, xs, xz, self.const(a["layer"] + ".weight", as_uint8(w)),
                                        self.const("ws", s_eff), self.const("wz", as_uint8(np.zeros(len(s_eff)))),
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
            build = {"conv": self._conv, "mul": self._mul}.get(src.kind, self._pool)
            layout = self.layout[xin[0] if src.kind == "mul" else xin]
            out = self._codes(build(src, xin, op), g, layout)
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
        n = self.users.get(op.output, 0)
        if n != 1:
            raise ValueError(f"{op.kind} {op.output!r} acts on the unquantized output of {src.kind} "
                             f"{src.attrs.get('layer', src.output)!r} and its result has {n} consumers (a conv and a "
                             "residual add, say); the QLinear form runs a layer and its requantization as one QLinear "
                             "op, so that output must be requantized exactly once. Quantize it in the model (a "
                             "residual network: qcnn.integer.add_residual_quantizers(q) before calibration, the int8 "
                             "deployment model of docs/integer.md, gives such convs an output quantizer) or export "
                             "form='qdq'")
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
                        pads=[p[0], p[1], p[0], p[1]], dilations=a["dilation"], ceil_mode=int(a.get("ceil_mode", 0)))
        self.kind[out], self.shift[out], self.layout[out] = self.kind[x], self.shift[x], "nhwc"
        return out

    def op_sumpool(self, op: Op, x: str) -> str:
        if self.kind[x][0] != "q" or self.layout.get(x) != "nhwc" or self.users.get(op.output, 0) != 1:
            raise ValueError(f"{op.output}: pooling of a float accumulator is not expressible in the QLinear form")
        self.pending[op.output] = (op, x, [])
        self.kind[op.output] = ("acc",)
        return op.output

    def _same_layout(self, xs: tuple[str, ...], base: str) -> list[str]:
        """``xs`` in one layout (NCHW unless they all are NHWC)."""
        if len({self.layout.get(x, "nchw") for x in xs}) == 1:
            return list(xs)
        return [self._to_nchw(x, f"{base}_in{i}") for i, x in enumerate(xs)]

    def op_concat(self, op: Op, *xs: str) -> str:
        if any(self.kind[x][0] != "q" for x in xs):
            raise ValueError(f"concatenation {op.attrs['layer']!r}: an operand is not codes")
        xs = self._same_layout(xs, op.output)
        out = self.node("Concat", xs, op.output, axis=self._axes(xs[0])[op.attrs["dim"]])
        return self._codes(out, op.attrs["grid"], self.layout.get(xs[0], "nchw"))

    def op_mul(self, op: Op, a: str, b: str) -> str:
        """Deferred to its requantization: ``com.microsoft.QLinearMul``."""
        if self.kind[a][0] != "q" or self.kind[b][0] != "q" or self.users.get(op.output, 0) != 1:
            raise ValueError(f"product {op.attrs['layer']!r}: the QLinear form needs two code operands and one "
                             "requantization")
        self.pending[op.output] = (op, tuple(self._same_layout((a, b), op.output)), [])
        self.kind[op.output] = ("acc",)
        return op.output

    def _mul(self, op: Op, xs: tuple[str, str], rq: Op) -> str:
        (sa, za), (sb, zb) = self._sz(xs[0]), self._sz(xs[1])
        ys, yz = self._grid_sz(rq.attrs["grid"])
        return self.node("QLinearMul", [xs[0], sa, za, xs[1], sb, zb, ys, yz], rq.output + "_mul", domain=self.MS)

    def op_lut(self, op: Op, x: str) -> str:
        """The table over all 256 uint8 codes (shifts of both grids folded in): one ``Gather``, exact."""
        a, g = op.attrs, op.attrs["grid"]
        if self.kind[x][0] != "q":
            raise ValueError(f"activation {a['layer']!r}: its input is not codes")
        t = op.tensors["table"].numpy().astype(np.int64)
        idx = np.clip(np.arange(256) - self.shift[x], a["input_qmin"], a["input_qmin"] + len(t) - 1) - a["input_qmin"]
        table = (t[idx] + (128 if g["qmin"] < 0 else 0)).astype(np.uint8)
        i64 = self.node("Cast", [x], op.output + "_i64", to=self.TP.INT64)
        out = self.node("Gather", [self.const("table", table), i64], op.output, axis=0)
        return self._codes(out, g, self.layout.get(x, "nchw"))

    def op_permute(self, op: Op, x: str) -> str:
        if x in self.pending:  # applied to the codes once the accumulator is requantized
            return self._defer(op, x)
        x = self._to_nchw(x, op.output)
        out = self.node("Transpose", [x], op.output, perm=op.attrs["dims"])
        return self._copy_meta(out, x, "nchw")

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
        if x in self.pending:  # an accumulator read as the network's output: no grid to requantize it to
            x = self._float_head(x)
        return self.float_of(self._to_nchw(x, op.output), op.output)

    def _float_head(self, x: str) -> str:
        """A conv whose accumulator is the network's output (a detector's head): emitted as QDQ,
        ``DequantizeLinear -> Conv`` with int8 weights and int32 bias (as the classifier's ``Gemm``)."""
        src, xin, posts = self.pending.pop(x)
        if src.kind != "conv" or posts:
            what = " after ".join([p.kind for p in reversed(posts)] + [src.kind])
            raise ValueError(f"{what} {src.attrs.get('layer', src.output)!r}: its unquantized output is the network's "
                             "output, which the QLinear form expresses only for a conv read as it is; quantize that "
                             "output in the model or export form='qdq' / form='integer'")
        return super().op_linear(src, self._to_nchw(xin, src.output))

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


__all__ = ["QLinearBuilder"]

"""ONNX export of an :class:`~qcnn.integer.engine.IntegerModel` in QDQ form, and an ONNX Runtime runner.

The graph is built with ``onnx.helper`` directly from the compiled integer model (opset 13), so what is
exported is exactly the integer model: activations travel between layers as int8/uint8 codes,
``QuantizeLinear`` / ``DequantizeLinear`` carry each grid's scale and zero point, weights are int8 initializers
with per-channel ``DequantizeLinear(axis=0)``, biases are int32 with scale ``s_x s_w``. ONNX Runtime's
graph optimiser fuses ``DQ -> Conv -> Q`` into ``QLinearConv``, ``DQ -> Add -> Q`` into ``QLinearAdd``,
``DQ -> Gemm -> Q`` into ``QGemm``, etc. (see :func:`optimized_op_counts`).

Mapping of the integer operations:

* ``quantize`` -> ``QuantizeLinear`` (a float ``Clip`` first for grids narrower than the 8-bit container);
* ``conv`` / ``linear`` -> ``DequantizeLinear(x)``, ``Conv`` / ``Gemm`` with ``DequantizeLinear`` weights and
  bias (a BatchNorm folded by the engine is folded into the per-channel weight scale; a negative BN scale
  negates the weight codes);
* ``requant`` -> optional ``Relu`` / ``Clip`` then ``QuantizeLinear`` (from codes: ``DequantizeLinear`` first);
* ``add`` -> ``DequantizeLinear`` of code operands, ``Add``, ``QuantizeLinear``;
* ``clamp`` on codes -> ``Clip`` on the int8/uint8 tensor; ``maxpool`` -> ``MaxPool`` (on codes directly);
  ``sumpool`` -> ``AveragePool`` / ``GlobalAveragePool``; ``reshape`` / ``getitem`` / ``pad`` ->
  ``Reshape`` / ``Slice`` / ``Pad``; ``dequantize`` -> ``DequantizeLinear``.

ONNX Runtime computes the bias in accumulator units (int32, as Jacob et al.) and requantizes in float, so
its codes can differ from the simulation by one LSB where the value is near a rounding tie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcnn.integer.engine import IntegerModel, Op

OPSET = 13


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
        self.ndim = {k: len(v) for k, v in im.value_shapes().items()}

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base.replace('#', '_')}__{self.n}"

    def const(self, base: str, arr) -> str:
        n = self.name(base)
        self.inits.append(self.nph.from_array(np.asarray(arr), n))
        return n

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
        if a.get("lo_real") is not None or a.get("hi_real") is not None:
            lo = np.float32(a["lo_real"] if a.get("lo_real") is not None else -3.0e38)
            hi = np.float32(a["hi_real"] if a.get("hi_real") is not None else 3.0e38)
            x = self.node("Clip", [x, self.const("lo", lo), self.const("hi", hi)], "input_clip")
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

    def op_pad(self, op: Op, x: str) -> str:
        pad = op.attrs["pad"]
        nd = 4
        begins, ends = [0] * nd, [0] * nd
        for i in range(len(pad) // 2):
            begins[nd - 1 - i] = pad[2 * i]
            ends[nd - 1 - i] = pad[2 * i + 1]
        k = self.kind[x]
        val = k[1](op.attrs["value"]) if k[0] == "q" else np.float32(0.0)
        out = self.node("Pad", [x, self.const("pads", np.array(begins + ends, np.int64)), self.const("v", val)],
                        op.output, mode="constant")
        self.kind[out] = k
        return out

    def op_dequantize(self, op: Op, x: str) -> str:
        return self.float_of(x, op.output)

    def _shape(self, value: str) -> list:
        """Symbolic output shape (batch ``N``, other dims unknown) of an engine value."""
        return ["N"] + [None] * (self.ndim.get(value, 2) - 1)

    def build(self, extra_outputs: dict[str, str] | None = None, forced: bool = False):
        TP, helper = self.TP, self.helper
        env = {self.im.input_name: "input"}
        self.kind["input"] = ("f",)
        shape = ["N"] + list(self.im.input_shape)
        inputs = [helper.make_tensor_value_info("input", TP.FLOAT, shape)]
        produced = {}
        force_keys = {k: p for p, k in (extra_outputs or {}).items()} if forced else {}
        for op in self.im.ops:
            args = [env[i] for i in op.inputs]
            fn = getattr(self, "op_linear" if op.kind in ("conv", "linear") else f"op_{op.kind}")
            env[op.output] = fn(op, *args)
            if op.output in force_keys:  # downstream reads the codes from a graph input instead
                produced[op.output] = env[op.output]
                k = self.kind[env[op.output]]
                name = "force:" + force_keys[op.output]
                dt = TP.UINT8 if k[1] is np.uint8 else TP.INT8
                inputs.append(helper.make_tensor_value_info(name, dt, self._shape(op.output)))
                env[op.output] = name
                self.kind[name] = k
        outputs = []
        for i, o in enumerate(self.im.output_names):
            name = "logits" if i == 0 else f"output{i}"
            self.nodes.append(helper.make_node("Identity", [env[o]], [name], name=f"{name}_identity"))
            outputs.append(helper.make_tensor_value_info(name, TP.FLOAT, self._shape(o)))
        out_names = {}
        for point, key in (extra_outputs or {}).items():
            v = produced.get(key, env[key])
            if v in out_names.values() or v == "input" or v.startswith("force:"):
                out_names[point] = v
                continue
            dt = TP.UINT8 if self.kind[v][1] is np.uint8 else TP.INT8
            outputs.append(helper.make_tensor_value_info(v, dt, self._shape(key)))
            out_names[point] = v
        graph = helper.make_graph(self.nodes, "qcnn_integer", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="qcnn")
        model.ir_version = min(model.ir_version, 9)
        self.onnx.checker.check_model(model)
        return model, out_names


def to_onnx(im: IntegerModel, path: str | Path | None = None, with_codes: bool = False, forced: bool = False):
    """ONNX QDQ model of ``im`` (an ``onnx.ModelProto``; written to ``path`` if given).

    ``with_codes`` adds the int8/uint8 codes of every quantizer point as extra graph outputs and returns
    ``(model, point -> output name)``. ``forced`` (with ``with_codes``) also makes every point's consumers read
    its codes from an extra graph input ``force:<point>`` (teacher forcing: each layer can then be checked on
    exactly the simulation's input codes)."""
    model, names = _Builder(im).build(im.points if with_codes else None, forced=forced and with_codes)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(model.SerializeToString())
        tmp.replace(path)
    return (model, names) if with_codes else model


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


__all__ = ["OPSET", "OrtModel", "optimized_op_counts", "to_onnx"]

"""What every ONNX form of an :class:`~qcnn.integer.runtime.IntegerModel` shares: the graph builder.

:class:`GraphBuilder` walks the integer ops in order and calls ``op_<kind>(op, *inputs)`` of the form
(``op_linear`` for ``conv`` and ``linear``), each returning the name of the ONNX value that holds the op's
output; it names nodes and initializers, tracks what each value holds (``kind``), exposes quantizer codes as
extra graph outputs (``with_codes``), replaces them by graph inputs (``forced``) and assembles and checks the
model. The shape-only operations (``reshape``, ``getitem``) are the same in every NCHW form and live here.

The forms: :mod:`qcnn.integer.onnx_qdq` (QDQ), :mod:`qcnn.integer.onnx_qlinear` (QLinear, on top of QDQ) and
:mod:`qcnn.integer.onnx_integer` (integer operators); :func:`qcnn.integer.onnx_export.to_onnx` picks one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qcnn.integer.ir import Op
from qcnn.integer.runtime import IntegerModel

OPSET = 13
TENSOR_TYPES = {np.uint8: 2, np.int8: 3, np.int64: 7}  # onnx.TensorProto UINT8, INT8, INT64


def load_onnx():
    """``(onnx, TensorProto, helper, numpy_helper)``; onnx takes most of a second to import, so it is
    loaded on the first export rather than with :mod:`qcnn.integer`."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover - onnx is a dependency
        raise RuntimeError("ONNX export needs the 'onnx' package (pip install onnx)") from e
    return onnx, TensorProto, helper, numpy_helper


def write_model(model, path: str | Path) -> Path:
    """Write ``model`` (an ``onnx.ModelProto``) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.SerializeToString())
    tmp.replace(path)
    return path


def container(qmin: int, qmax: int, where: str):
    """The 8-bit numpy type that holds codes in ``[qmin, qmax]``."""
    if qmin >= 0 and qmax <= 255:
        return np.uint8
    if qmin >= -128 and qmax <= 127:
        return np.int8
    raise ValueError(f"{where}: a {qmin}..{qmax} grid does not fit 8 bits; ONNX QDQ export supports <= 8 bits")


def as_uint8(codes) -> np.ndarray:
    """int8-range codes (or zero points) shifted by 128 into uint8: with the zero point shifted alike, the same real
    values. ONNX Runtime's uint8 x uint8 kernels are exact on x86 CPUs without VNNI, where its uint8 x int8 ones
    saturate pairs of products in int16 (:mod:`qcnn.integer.cpu`)."""
    return (np.asarray(codes).astype(np.int16) + 128).astype(np.uint8)


def onnx_pads(pad: list[int], nd: int = 4) -> list[int]:
    """ONNX ``Pad`` pads (all begins, then all ends) of a ``F.pad`` spec (last dimension first)."""
    begins, ends = [0] * nd, [0] * nd
    for i in range(len(pad) // 2):
        begins[nd - 1 - i] = pad[2 * i]
        ends[nd - 1 - i] = pad[2 * i + 1]
    return begins + ends


class GraphBuilder:
    """Base of the ONNX forms (see the module docstring). ``kind[value]`` is what an ONNX value holds:
    ``("f",)`` float, ``("q", numpy dtype, scale, zero point, ...)`` codes; a form may add its own kinds."""

    def __init__(self, im: IntegerModel):
        self.onnx, self.TP, self.helper, self.nph = load_onnx()
        self.im = im
        self.nodes = []
        self.inits = []
        self.kind: dict[str, tuple] = {}  # value -> ("q", np dtype, scale, zp) | ("f",)
        self.n = 0
        self.shapes = im.value_shapes()  # engine value -> shape for a batch of one
        self.ndim = {k: len(v) for k, v in self.shapes.items()}

    # -- naming ------------------------------------------------------------------------------------------
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

    # -- shape-only operations (kind unchanged) ----------------------------------------------------------
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

    # -- hooks of the forms ------------------------------------------------------------------------------
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

    # -- assembly ----------------------------------------------------------------------------------------
    def emit_op(self, op: Op, args: list[str]) -> str:
        """ONNX value of the output of ``op`` (``op_linear`` builds both ``conv`` and ``linear``)."""
        fn = getattr(self, "op_linear" if op.kind in ("conv", "linear") else f"op_{op.kind}", None)
        if fn is None:
            raise ValueError(f"integer operation {op.kind!r} ({op.output}) has no ONNX form here")
        return fn(op, *args)

    def _ops(self, inputs: list, forced: dict[str, str], offsets: dict[str, int]) -> tuple[dict, dict]:
        """Build every op; values whose codes are forced are read from the graph inputs ``force:<point>``."""
        env = {self.im.input_name: "input"}
        produced = {}
        for op in self.im.ops:
            env[op.output] = self.emit_op(op, [env[i] for i in op.inputs])
            if op.output in forced:  # downstream reads the codes from a graph input instead
                v = env[op.output]
                produced[op.output] = v
                k = self.kind[v]
                name = "force:" + forced[op.output]
                inputs.append(self.helper.make_tensor_value_info(name, TENSOR_TYPES[k[1]], self._shape(op.output)))
                self.kind[name] = k
                env[op.output] = self.forced_input(name, v)
                offsets[name] = self.code_offset(v)
        return env, produced

    def _code_outputs(self, extra_outputs: dict[str, str], env: dict, produced: dict, outputs: list,
                      offsets: dict[str, int]) -> dict[str, str]:
        """Expose the codes of each point (``point -> engine value``) as graph outputs; point -> output name."""
        out_names: dict[str, str] = {}
        exposed: dict[str, str] = {}
        for point, key in extra_outputs.items():
            v = produced.get(key, env[key])
            if v == "input" or v.startswith("force:"):
                out_names[point] = v
                continue
            if v not in exposed:
                ov = self.extra_output(v, key)
                outputs.append(self.helper.make_tensor_value_info(ov, TENSOR_TYPES[self.kind[v][1]], self._shape(key)))
                exposed[v] = ov
                offsets[ov] = self.code_offset(v)
            out_names[point] = exposed[v]
        return out_names

    def build(self, extra_outputs: dict[str, str] | None = None, forced: bool = False):
        """``(onnx.ModelProto, point -> graph output name)``; ``extra_outputs`` maps points to engine values."""
        TP, helper = self.TP, self.helper
        self.kind["input"] = ("f",)
        inputs = [helper.make_tensor_value_info("input", TP.FLOAT, ["N"] + list(self.im.input_shape))]
        offsets: dict[str, int] = {}
        force_keys = {k: p for p, k in (extra_outputs or {}).items()} if forced else {}
        env, produced = self._ops(inputs, force_keys, offsets)
        outputs = []
        for i, o in enumerate(self.im.output_names):
            name = "logits" if i == 0 else f"output{i}"
            self.nodes.append(helper.make_node("Identity", [env[o]], [name], name=f"{name}_identity"))
            outputs.append(helper.make_tensor_value_info(name, TP.FLOAT, self._shape(o)))
        out_names = self._code_outputs(extra_outputs or {}, env, produced, outputs, offsets)
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


__all__ = ["OPSET", "TENSOR_TYPES", "GraphBuilder", "as_uint8", "container", "load_onnx", "onnx_pads", "write_model"]

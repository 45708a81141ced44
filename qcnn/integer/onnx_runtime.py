"""Running exported models in ONNX Runtime: :class:`OrtModel`, :func:`ort_codes`, :func:`optimized_op_counts`."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from qcnn.integer.cpu import u8s8_saturates
from qcnn.integer.onnx_builder import as_uint8, load_onnx


def uint8_weights(model):
    """A copy of ``model`` whose int8 weights (``DequantizeLinear`` initializers feeding only the weight input of
    Conv / Gemm / MatMul) are uint8 shifted by 128, their zero points too: the same real values. ONNX Runtime
    fuses such QDQ convs into uint8 x uint8 kernels, which are exact on x86 CPUs without VNNI where its uint8 x
    int8 ones saturate pairs of products in int16 (:mod:`qcnn.integer.cpu`; measured on a QDQ Conv1d export:
    0.0086 off against a one-LSB bound of 0.0022, 3e-8 with uint8 weights)."""
    onnx = load_onnx()[0]
    nph = onnx.numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    users: dict[str, list] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            users.setdefault(i, []).append((n.op_type, k))
    for n in g.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits or n.input[2] not in inits:
            continue
        w, z = nph.to_array(inits[n.input[0]]), nph.to_array(inits[n.input[2]])
        if w.dtype != np.int8 or w.ndim < 2 or z.dtype != np.int8:
            continue
        if not all(t in ("Conv", "Gemm", "MatMul") and k == 1 for t, k in users.get(n.output[0], [])) or \
                any(t != "DequantizeLinear" or k != 0 for t, k in users[n.input[0]]):
            continue
        wn, zn = n.input[0] + ".u8", n.output[0] + ".zero_point_u8"
        g.initializer.extend([nph.from_array(as_uint8(w), wn), nph.from_array(as_uint8(z), zn)])
        n.input[0], n.input[2] = wn, zn
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output} | {i.name for i in g.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


class OrtModel:
    """ONNX Runtime session on an exported model (all graph optimisations on, CPU by default). On an x86 CPU
    without VNNI the model's int8 conv / linear weights are handed to ONNX Runtime as uint8 (:func:`uint8_weights`),
    so that its fused int8 kernels do not saturate."""

    def __init__(self, model, threads: int | None = None, providers: list[str] | None = None,
                 optimized_path: str | Path | None = None):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        if (providers is None or providers == ["CPUExecutionProvider"]) and u8s8_saturates():
            model = uint8_weights(model if hasattr(model, "SerializeToString") else load_onnx()[0].load(str(model)))
        data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
        self.session = ort.InferenceSession(data, so, providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, x: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
        return self.session.run(None, {self.input_name: arr})

    def __call__(self, x) -> torch.Tensor | list[torch.Tensor]:
        """The network's output: ``logits`` (one tensor), or ``[logits, output1, ...]`` for a network of several
        outputs (a detector's per-level heads); the code outputs of a ``with_codes`` export are left out."""
        outs = self.run(x)
        net = [i for i, n in enumerate(self.output_names) if n == "logits" or (n.startswith("output") and
                                                                               n[6:].isdigit())]
        if len(net) <= 1:
            return torch.from_numpy(outs[0])
        return [torch.from_numpy(outs[i]) for i in net]


def ort_codes(model, names: dict[str, str], x: torch.Tensor, force: dict[str, torch.Tensor] | None = None,
              threads: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run a ``with_codes`` export (``to_onnx(..., with_codes=True[, forced=True])``) in ONNX Runtime on ``x``;
    ``force`` gives the codes fed to the ``force:<point>`` inputs (engine codes, int64). Returns ``(logits, point
    -> engine codes as int64)``."""
    props = {p.key: p.value for p in model.metadata_props}
    offsets = json.loads(props.get("qcnn.code_offsets", "{}"))
    session = OrtModel(model, threads=threads)
    feeds = {"input": x.detach().cpu().float().numpy()}
    for i in session.session.get_inputs():
        if i.name.startswith("force:"):
            if force is None or i.name[6:] not in force:
                raise ValueError(f"the model reads forced codes for {i.name[6:]!r}; pass them in force")
            dt = np.uint8 if "uint8" in i.type else np.int64 if "int64" in i.type else np.int8
            feeds[i.name] = (force[i.name[6:]].cpu().numpy() + offsets.get(i.name, 0)).astype(dt)
    outs = session.session.run(None, feeds)
    got = {p: torch.from_numpy(outs[session.output_names.index(n)].astype(np.int64) - offsets.get(n, 0))
           for p, n in names.items() if n in session.output_names}
    return torch.from_numpy(outs[0]), got


def optimized_op_counts(model, threads: int | None = None) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime actually runs (after its QDQ fusions)."""
    onnx = load_onnx()[0]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "optimized.onnx"
        OrtModel(model, threads=threads, optimized_path=p)
        g = onnx.load(str(p)).graph
    counts: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}.{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["OrtModel", "optimized_op_counts", "ort_codes", "uint8_weights"]

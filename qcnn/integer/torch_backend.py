"""Lowering of an :class:`~qcnn.integer.runtime.IntegerModel` to PyTorch's quantized CPU kernels (x86: fbgemm /
oneDNN, the kernels torch.ao's int8 models call).

:func:`to_torch_quantized` maps the integer operations onto ``torch.ops.quantized`` with the same grids, int8
weights and int32 biases as the engine and the ONNX export:

* every activation grid is a ``quint8`` tensor (a signed grid is shifted by +128, zero point included: the
  same real values);
* ``quantize``: ``torch.quantize_per_tensor``; ``conv`` + its ``requant``: ``quantized::conv2d`` with
  prepacked per-channel int8 weights (zero weight zero points) and the bias ``b_q = s_x s_w round(b /
  (s_x s_w))``, which the kernel turns back into exactly that int32 bias; ``add``: ``quantized::add``;
  clamps narrower than the container (ReLU on a signed grid, ReLU6): ``torch.clamp`` on the quantized tensor;
  max pool, slicing, zero padding (by the zero point) and reshapes run on the quantized tensor;
* the tail (pooling of codes, the classifier) is tiny: the window sums and the ``linear`` accumulator are
  computed from the integer codes in float32, where every partial sum is an integer below 2^24 (checked), so
  exactly, then requantized / scaled like the engine.

On x86 CPUs without AVX512-VNNI, fbgemm and oneDNN multiply uint8 codes by int8 weights with ``vpmaddubsw``,
which adds each pair of adjacent products in saturating int16: a conv whose uint8 input codes ``x`` and weights
``w`` allow ``2 max(x) max|w| > 32767`` (8-bit weights on a full 8-bit grid) can return wrong codes there
(measured: LeNet-5 W8A8 logits 0.04 off, 7-bit weights exact). :func:`to_torch_quantized` names such layers in
a ``RuntimeWarning`` on those CPUs; the integer engine and the ONNX export are exact on them.

Requantization is the kernels' own (float multiplier, round to nearest even), so codes can differ from the
simulation by one LSB next to rounding ties, as ONNX Runtime's. Unsupported graphs raise a ValueError that names
the operation.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcnn.integer.cpu import u8s8_saturates
from qcnn.integer.ir import Op, index_from_json
from qcnn.integer.runtime import IntegerModel


def _shift(grid: dict) -> int:
    return 128 if grid["qmin"] < 0 else 0


def int16_pairs_saturate() -> bool:
    """Whether torch's x86 int8 kernels on this CPU add pairs of uint8 x int8 products in saturating int16: an x86
    engine (``x86`` / ``fbgemm`` / ``onednn``) on an x86 CPU without AVX512-VNNI or AMX (fbgemm does not use
    AVX-VNNI); see :mod:`qcnn.integer.cpu`."""
    if torch.backends.quantized.engine == "qnnpack":
        return False
    return u8s8_saturates(("avx512_vnni", "amx_int8"))


class TorchQuantizedModel(nn.Module):
    """Runs a list of closures over quantized tensors; ``forward(x)`` takes float NCHW input, returns floats."""

    def __init__(self, steps, input_name: str, output_name: str):
        super().__init__()
        self.steps = steps
        self.input_name = input_name
        self.output_name = output_name

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        env = {self.input_name: x}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in recent torch
            for out, fn, ins in self.steps:
                env[out] = fn(*[env[i] for i in ins])
        return env[self.output_name]


class _Lowering:
    def __init__(self, im: IntegerModel):
        self.im = im
        self.grid: dict[str, dict] = {}  # value -> grid of its quint8 codes
        self.users: dict[str, int] = {}
        for op in im.ops:
            for i in op.inputs:
                self.users[i] = self.users.get(i, 0) + 1
        self.pending: dict[str, tuple[Op, str, list]] = {}
        self.steps: list = []
        self.acc_float: dict[str, tuple] = {}  # value -> (kind, scale tensor, offset) for float-held accumulators
        self.saturating: list[str] = []  # convs whose pairs of products can leave int16 (see the module docstring)

    def emit(self, out: str, fn, ins: list[str]) -> str:
        self.steps.append((out, fn, ins))
        return out

    def clamp(self, v: str, grid: dict, lo: int, hi: int, out: str) -> str:
        """``out`` = ``v`` clamped to codes [lo, hi] of ``grid`` (an alias when uint8 already bounds it)."""
        sh = _shift(grid)
        lo_u, hi_u = max(lo + sh, 0), min(hi + sh, 255)
        self.grid[out] = grid
        if lo_u == 0 and hi_u == 255:
            return v if v == out else self.emit(out, lambda t: t, [v])
        s, z = grid["scale"], grid["zero_point"]
        lo_r, hi_r = s * (lo - z), s * (hi - z)
        return self.emit(out, lambda t: torch.clamp(t, lo_r, hi_r), [v])

    def op_quantize(self, op: Op) -> None:
        a = op.attrs
        g = a["grid"]
        s, z = float(np.float32(g["scale"])), g["zero_point"] + _shift(g)
        lo, hi = a.get("lo_real"), a.get("hi_real")

        def quant(x, s=s, z=z, lo=lo, hi=hi):
            if lo is not None or hi is not None:
                x = torch.clamp(x, lo, hi)
            return torch.quantize_per_tensor(x.float().contiguous(memory_format=torch.channels_last)
                                             if x.dim() == 4 else x.float(), s, z, torch.quint8)

        q = self.emit(op.output + "@q", quant, op.inputs)
        self.grid[q] = g
        self.clamp(q, g, a["qmin"], a["qmax"], op.output)

    def op_conv(self, op: Op) -> None:
        if self.users.get(op.output, 0) != 1:
            raise ValueError(f"conv {op.attrs['layer']!r}: the accumulator needs exactly one requantization")
        self.pending[op.output] = (op, op.inputs[0], [])

    def op_linear(self, op: Op) -> None:
        a, t = op.attrs, op.tensors
        w = (t["weight"].to(torch.int64) - t["weight_zero_point"].to(torch.int64).reshape(-1, 1)) * \
            t["sign"].to(torch.int64).reshape(-1, 1)
        g = self.grid[op.inputs[0]]
        bound = float(w.abs().sum(1).max()) * max(abs(g["qmin"] - g["zero_point"]), abs(g["qmax"] - g["zero_point"]))
        if bound >= 2**24:
            raise ValueError(f"linear {a['layer']!r}: accumulator bound {bound:.3g} exceeds float32's exact 2^24")
        wf = w.t().float().contiguous()
        z = g["zero_point"] + _shift(g)
        b_int = t["bias"].to(torch.float32)  # zeros unless bias_mode="accumulator"
        self.emit(op.output, lambda x: torch.matmul(x.int_repr().float() - z, wf) + b_int, op.inputs)
        sc = t["acc_scale"].to(torch.float64)
        self.acc_float[op.output] = (sc, t["bias_real"].to(torch.float64) - t["bias"].to(torch.float64) * sc)

    def _conv(self, op: Op, x: str, rq: Op) -> str:
        a, t = op.attrs, op.tensors
        w = (t["weight"].to(torch.int64) * t["sign"].to(torch.int64).reshape(-1, 1, 1, 1))
        if bool((t["weight_zero_point"] != 0).any()) or int(w.min()) < -128 or int(w.max()) > 127:
            raise ValueError(f"conv {a['layer']!r}: PyTorch's quantized conv needs symmetric int8 weights")
        s_x = float(np.float32(a["input_scale"]))
        s_w = (t["acc_scale"].to(torch.float64) / a["input_scale"]).to(torch.float32).to(torch.float64)
        wq = torch.quantize_per_channel((w.to(torch.float64) * s_w.reshape(-1, 1, 1, 1)).float(), s_w,
                                        torch.zeros_like(s_w, dtype=torch.int64), 0, torch.qint8)
        if not torch.equal(wq.int_repr().to(torch.int64), w):
            raise ValueError(f"conv {a['layer']!r}: the int8 weight codes do not survive PyTorch's quantization")
        xg = self.grid[x]
        x_max = xg["qmax"] + _shift(xg)
        if 2 * x_max * int(w.abs().max()) > 32767:
            self.saturating.append(f"{a['layer']} (2 x {x_max} x {int(w.abs().max())})")
        bias_int = torch.round(t["bias_real"].to(torch.float64) / (s_x * s_w))
        bias = (bias_int * (s_x * s_w)).to(torch.float32)
        packed = torch.ops.quantized.conv2d_prepack(wq, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
        g = rq.attrs["grid"]
        s_y, z_y = float(np.float32(g["scale"])), g["zero_point"] + _shift(g)
        self.grid[rq.output + "@c"] = g
        return self.emit(rq.output + "@c", lambda q: torch.ops.quantized.conv2d(q, packed, s_y, z_y), [x])

    def op_requant(self, op: Op) -> None:
        g = op.attrs["grid"]
        x = op.inputs[0]
        s, z = float(np.float32(g["scale"])), g["zero_point"] + _shift(g)
        if x in self.pending:
            src, xin, posts = self.pending.pop(x)
            out = self._conv(src, xin, op)
            for post in posts:
                out = getattr(self, f"post_{post.kind}")(post, out)
        elif x in self.acc_float:  # float-held accumulator (linear / pooled sums): scale, offset, quantize
            sc, off = self.acc_float[x]
            scale = sc.float().reshape(-1)
            offset = off.float().reshape(-1) if off is not None else torch.zeros(1)
            out = self.emit(op.output + "@q", lambda a: torch.quantize_per_tensor(
                (a * scale.reshape([1, -1] + [1] * (a.dim() - 2)) + offset.reshape([1, -1] + [1] * (a.dim() - 2)))
                .contiguous(), s, z, torch.quint8), [x])
            self.grid[out] = g
        else:  # codes on one grid -> another
            out = self.emit(op.output + "@q", lambda a: torch.quantize_per_tensor(a.dequantize(), s, z, torch.quint8),
                            [x])
            self.grid[out] = g
        self.clamp(out, g, op.attrs["lo"], op.attrs["hi"], op.output)

    def post_maxpool(self, op: Op, x: str) -> str:
        a = op.attrs
        out = self.emit(op.output, lambda t: F.max_pool2d(t, a["kernel"], a["stride"], a["padding"], a["dilation"],
                                                         ceil_mode=bool(a.get("ceil_mode", False))), [x])
        self.grid[out] = self.grid[x]
        return out

    def post_reshape(self, op: Op, x: str) -> str:
        shape = list(op.attrs["shape"])
        out = self.emit(op.output, lambda t: t.reshape([t.shape[0]] + shape), [x])
        self.grid[out] = self.grid[x]
        return out

    def op_maxpool(self, op: Op) -> None:
        x = op.inputs[0]
        if x in self.pending:  # requantization is monotone per channel: pool the codes afterwards
            src, xin, posts = self.pending.pop(x)
            self.pending[op.output] = (src, xin, posts + [op])
            return
        self.post_maxpool(op, x)

    def op_reshape(self, op: Op) -> None:
        x = op.inputs[0]
        if x in self.pending:
            src, xin, posts = self.pending.pop(x)
            self.pending[op.output] = (src, xin, posts + [op])
        elif x in self.acc_float:
            shape = list(op.attrs["shape"])
            self.emit(op.output, lambda t: t.reshape([t.shape[0]] + shape), [x])
            sc, off = self.acc_float[x]
            self.acc_float[op.output] = (sc.reshape(-1), off.reshape(-1) if off is not None else None)
        else:
            self.post_reshape(op, x)

    def op_add(self, op: Op) -> None:
        if any(i not in self.grid for i in op.inputs):
            raise ValueError(f"add {op.attrs['layer']!r}: an operand is not quantized (add_residual_quantizers)")
        g = op.attrs["grid"]
        s, z = float(np.float32(g["scale"])), g["zero_point"] + _shift(g)
        out = self.emit(op.output + "@a", lambda a, b: torch.ops.quantized.add(a, b, s, z), op.inputs)
        self.grid[out] = g
        self.clamp(out, g, op.attrs["lo"], op.attrs["hi"], op.output)

    def op_clamp(self, op: Op) -> None:
        x = op.inputs[0]
        if x not in self.grid:
            raise ValueError(f"{op.output}: a clamp on a float accumulator is not supported by this lowering")
        g = self.grid[x]
        sh = _shift(g)
        lo = int(op.tensors["lo"]) if "lo" in op.tensors else -sh
        hi = int(op.tensors["hi"]) if "hi" in op.tensors else 255 - sh
        self.clamp(x, g, lo, hi, op.output)

    def op_sumpool(self, op: Op) -> None:
        x = op.inputs[0]
        if x not in self.grid:
            raise ValueError(f"{op.output}: pooling of a float accumulator is not supported by this lowering")
        a = op.attrs
        g = self.grid[x]
        z = g["zero_point"] + _shift(g)
        k = a["kernel"][0] * a["kernel"][1]
        if k * 255 >= 2**24:
            raise ValueError(f"{op.output}: window of {k} exceeds float32's exact integer range")
        if a.get("global"):
            fn = lambda t: (t.int_repr().float() - z).sum(dim=(-2, -1), keepdim=True)  # noqa: E731
        else:
            fn = lambda t: F.avg_pool2d(t.int_repr().float() - z, a["kernel"], a["stride"], a["padding"],  # noqa: E731
                                        count_include_pad=True, divisor_override=1)
        self.emit(op.output, fn, [x])
        scale = torch.full((1,), g["scale"] / k, dtype=torch.float64)
        self.acc_float[op.output] = (scale, None)

    def op_getitem(self, op: Op) -> None:
        idx = index_from_json(op.attrs["index"])
        self.emit(op.output, lambda t: t[idx], op.inputs)
        self.grid[op.output] = self.grid[op.inputs[0]]

    def op_pad(self, op: Op) -> None:
        pad = op.attrs["pad"]
        if op.inputs[0] not in self.grid:
            raise ValueError(f"{op.output}: padding a float accumulator is not supported by this lowering")
        self.emit(op.output, lambda t: F.pad(t, pad), op.inputs)  # quantized pad fills with the zero point
        self.grid[op.output] = self.grid[op.inputs[0]]

    def op_dequantize(self, op: Op) -> None:
        x = op.inputs[0]
        if x in self.acc_float:
            sc, off = self.acc_float[x]
            scale = op.tensors["scale"].float()
            offset = op.tensors["offset"].float() if "offset" in op.tensors else torch.zeros(())
            self.emit(op.output, lambda a: a * scale + offset, [x])
        else:
            self.emit(op.output, lambda t: t.dequantize().contiguous(), [x])

    def build(self) -> TorchQuantizedModel:
        for op in self.im.ops:
            fn = getattr(self, f"op_{op.kind}", None)
            if fn is None:
                raise ValueError(f"integer operation {op.kind!r} ({op.output}) is not supported by the PyTorch "
                                 "lowering")
            fn(op)
        if self.pending:
            raise ValueError(f"accumulators {sorted(self.pending)} are never requantized")
        if len(self.im.output_names) != 1:
            raise ValueError("the PyTorch lowering supports one network output")
        return TorchQuantizedModel(self.steps, self.im.input_name, self.im.output_names[0])


def to_torch_quantized(im: IntegerModel) -> TorchQuantizedModel:
    """PyTorch quantized-kernel model of ``im`` (CPU; engine ``x86``/``fbgemm``/``onednn``, whichever
    ``torch.backends.quantized.engine`` names). Raises ValueError for graphs it cannot express."""
    if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
        raise ValueError("this PyTorch build has no quantized CPU engine")
    lowering = _Lowering(im)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in recent torch
        model = lowering.build()
    if lowering.saturating and int16_pairs_saturate():
        warnings.warn(f"on this CPU (x86 without AVX512-VNNI) torch's {torch.backends.quantized.engine} int8 "
                      "kernels add pairs of products in saturating int16, and these convs' codes can exceed it: "
                      f"{', '.join(lowering.saturating)}; their outputs may be wrong (7-bit weights, the integer "
                      "engine or the ONNX export are exact)", RuntimeWarning, stacklevel=2)
    return model


__all__ = ["TorchQuantizedModel", "int16_pairs_saturate", "to_torch_quantized"]

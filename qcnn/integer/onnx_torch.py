"""ONNX export of any quantized model through torch's own exporter (``torch.onnx.export(..., dynamo=True)``).

The forms of :mod:`qcnn.integer.onnx_export` are built from the compiled integer model, op by op, which is what
bit-exactness needs and also why they cover only the ops the integer engine has. This module is the standard path
for everything else: the fake-quant model itself is exported, each quantizer becoming one
``QuantizeLinear`` -> ``DequantizeLinear`` pair and every other op (LayerNorm, GELU, Conv1d, ConvTranspose2d,
ops with no integer kernel) staying float between the pairs, with dynamic batch, height and width.

How: a copy of the model is frozen for deployment. Every uniform quantizer with one scale (activations, residual
adds, concatenations) is replaced by torch's ``fake_quantize_per_tensor_affine`` on its calibrated grid, which
torch's ONNX exporter writes as ``QuantizeLinear`` / ``DequantizeLinear`` (onnxscript's torchlib); a conv / linear
weight becomes its on-grid value with a per-channel (or per-tensor) fake-quant of its grid, i.e. an int8 weight
``DequantizeLinear(axis=0)`` after constant folding. Grids narrower than the 8-bit container (e.g. 4 bits) get a
float ``Clip`` to the grid's real range first (the same values); DoReFa / PACT weights take their odd integer
codes (:meth:`~qcnn.quant.base.Grid.integer_view`). QConvBn2d layers are folded first, as the integer engine
compiles them. Biases stay float (the runtime adds them in float or requantizes them itself).

``style="onnxruntime"`` (default) keeps the model's grids (uint8 activations after ReLU with their zero points).
``style="tensorrt"`` checks TensorRT's explicit-quantization rules and refuses by name what breaks them: every
activation grid signed int8 with zero point 0 and every weight grid signed int8, symmetric (zero point 0), per
output channel or per tensor. Quantize with the uniform method's ``act_grid: symmetric`` option (recipe
``params``) to get such activation grids.

The exported graph is the fake-quant model up to the runtime's arithmetic: ``QuantizeLinear`` divides by the
scale where torch multiplies by its float32 reciprocal, and the runtime's float convolutions sum in another
order, so a code can land one LSB away near a rounding tie (measured in ``tests/integer/test_onnx_torch.py`` and
``docs/integer.md``). Quantizers this cannot express (codebooks, per-channel activation grids, more than 8 bits)
are refused by name.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from qcnn.integer.onnx_builder import write_model
from qcnn.nn.layers import QConvTranspose2d
from qcnn.quant.base import GradientQuantizer, Grid, Quantizer
from qcnn.transform import fold_conv_bn

STYLES = ("onnxruntime", "tensorrt")


# torch's fake_quantize ops are traced as their "cachemask" variants, which torch.export cannot trace with dynamic
# shapes; two small custom ops (torch.library) with a shape-only fake implementation and an ONNX translation
# (QuantizeLinear -> DequantizeLinear) carry them through the exporter instead.
@torch.library.custom_op("qcnn::qdq", mutates_args=())
def qdq(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """``fake_quantize_per_tensor_affine`` (an exportable custom op)."""
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)


@qdq.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qcnn::qdq_per_channel", mutates_args=())
def qdq_per_channel(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, qmin: int, qmax: int) -> Tensor:
    """``fake_quantize_per_channel_affine`` (an exportable custom op)."""
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


@qdq_per_channel.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x)


def _onnx_translations() -> dict:
    """ONNX Script translations of the two custom ops (QuantizeLinear / DequantizeLinear, opset >= 13)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def _dtype(qmin: int):
        return ir.DataType.UINT8 if qmin == 0 else ir.DataType.INT8

    def onnx_qdq(x, scale: float, zero_point: int, qmin: int, qmax: int):
        s = op.Constant(value_float=float(scale))
        z = op.Cast(op.Constant(value_int=int(zero_point)), to=_dtype(qmin))
        return op.DequantizeLinear(op.QuantizeLinear(x, s, z), s, z)

    def onnx_qdq_per_channel(x, scale, zero_point, axis: int, qmin: int, qmax: int):
        z = op.Cast(zero_point, to=_dtype(qmin))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, z, axis=axis), scale, z, axis=axis)

    return {torch.ops.qcnn.qdq.default: onnx_qdq, torch.ops.qcnn.qdq_per_channel.default: onnx_qdq_per_channel}


def _container(grid: Grid, where: str) -> tuple[int, int]:
    """The 8-bit ONNX container (qmin, qmax) that holds ``grid``'s codes."""
    if grid.qmin >= 0 and grid.qmax <= 255:
        return 0, 255
    if grid.qmin >= -128 and grid.qmax <= 127:
        return -128, 127
    raise ValueError(f"{where}: codes [{grid.qmin}, {grid.qmax}] do not fit an 8-bit ONNX container "
                     "(QuantizeLinear holds int8 / uint8 codes); quantize it with at most 8 bits")


class ExportActFQ(nn.Module):
    """An activation quantizer frozen for export: ``fake_quantize_per_tensor_affine`` on the grid's 8-bit
    container, after a clamp to the grid's real range where the grid is narrower."""

    def __init__(self, grid: Grid, where: str):
        super().__init__()
        self.scale = float(grid.scale.reshape(-1)[0])
        self.zero_point = int(grid.zero_point.reshape(-1)[0]) if grid.zero_point is not None else 0
        self.qmin, self.qmax = int(grid.qmin), int(grid.qmax)
        self.cmin, self.cmax = _container(grid, where)

    def forward(self, x: Tensor) -> Tensor:
        if self.qmin > self.cmin or self.qmax < self.cmax:
            x = x.clamp(self.scale * (self.qmin - self.zero_point), self.scale * (self.qmax - self.zero_point))
        return qdq(x, self.scale, self.zero_point, self.cmin, self.cmax)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, zero_point={self.zero_point}, codes=[{self.qmin}, {self.qmax}]"


class ExportWeightFQ(nn.Module):
    """A weight quantizer frozen for export: the on-grid weight is fake-quantized again on its own grid (an
    identity on its values) so that the exporter writes the weight as codes + ``DequantizeLinear``."""

    def __init__(self, grid: Grid, where: str):
        super().__init__()
        self.cmin, self.cmax = _container(grid, where)
        self.per_channel = grid.scale.numel() > 1
        self.register_buffer("scale", grid.scale.detach().to(torch.float32).reshape(-1).clone())
        zp = grid.zero_point if grid.zero_point is not None else torch.zeros(1, dtype=torch.int32)
        self.register_buffer("zero_point", zp.detach().to(torch.int32).reshape(-1).expand(self.scale.numel()).clone())
        self.scale0, self.zero_point0 = float(self.scale[0]), int(self.zero_point[0])  # read once, not when traced

    def forward(self, w: Tensor) -> Tensor:
        if self.per_channel:
            return qdq_per_channel(w, self.scale, self.zero_point, 0, self.cmin, self.cmax)
        return qdq(w, self.scale0, self.zero_point0, self.cmin, self.cmax)


def _act_grid(q: Quantizer, where: str, style: str) -> Grid:
    if not q.is_initialized():
        raise ValueError(f"{where}: quantizer is not calibrated; calibrate or train the model first")
    g = q.grid()
    if not g.is_uniform or g.scale is None:
        raise ValueError(f"{where}: {type(q).__name__} has a codebook (non-uniform) grid, which QuantizeLinear "
                         "cannot express; export a uniform-grid model")
    if g.scale.numel() != 1:
        raise ValueError(f"{where}: per-channel activation grid (scale shape {tuple(g.scale.shape)}); ONNX export "
                         "needs one scale per activation tensor")
    if style == "tensorrt":
        zp = int(g.zero_point.reshape(-1)[0]) if g.zero_point is not None else 0
        if zp != 0 or g.qmin >= 0 or g.qmin < -128 or g.qmax > 127:
            raise ValueError(f"{where}: activation grid codes [{g.qmin}, {g.qmax}] with zero point {zp}; TensorRT "
                             "needs signed int8 activations with zero point 0 (quantize with the uniform method's "
                             "params act_grid: symmetric)")
    return g


def _weight_grid(q: Quantizer, where: str, style: str) -> Grid:
    g = q.grid().integer_view()
    if g is None:
        raise ValueError(f"{where}: weight quantizer {type(q).__name__} has a codebook grid that is not scale x "
                         "integers; QuantizeLinear cannot express it")
    if g.scale.numel() > 1 and g.axis not in (None, 0):
        raise ValueError(f"{where}: per-channel weight grid along axis {g.axis} (ONNX export expects axis 0)")
    if style == "tensorrt":
        zp = g.zero_point.reshape(-1) if g.zero_point is not None else torch.zeros(1)
        if bool((zp != 0).any()) or g.qmin < -128 or g.qmax > 127:
            raise ValueError(f"{where}: weight grid codes [{g.qmin}, {g.qmax}] with non-zero zero points; TensorRT "
                             "needs symmetric int8 weights (zero point 0)")
    return g


def _runs_on_another_size(m: nn.Module, example: Tensor) -> str | None:
    """None if ``m`` runs on an input 8 larger in every spatial dimension, else what failed."""
    other = torch.zeros((1, *example.shape[1:2], *(n + 8 for n in example.shape[2:])), dtype=example.dtype)
    try:
        with torch.no_grad():
            m(other)
    except Exception as e:  # noqa: BLE001 - any failure means the graph fixes the spatial size
        return f"{tuple(other.shape)}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def _fold_constant_quantize(mp):
    """Replace each ``QuantizeLinear`` of a constant (the weights) by its int8 / uint8 codes as an initializer, so
    that the file stores weights as codes + ``DequantizeLinear`` (what the runtime's constant folding would do:
    ``saturate(round_half_even(w / s) + z)``)."""
    import numpy as np
    from onnx import numpy_helper

    g = mp.graph
    init = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and len(n.attribute) == 1
              and n.attribute[0].type == onnx_attr_tensor()}

    def value(name):
        if name in init:
            return numpy_helper.to_array(init[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    keep, replaced = [], set()
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in init:
            w, s = value(n.input[0]), value(n.input[1])
            z = value(n.input[2]) if len(n.input) > 2 else np.zeros((), np.uint8)
            if w is not None and s is not None and z is not None:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * w.ndim
                if s.ndim == 1 and s.size > 1:
                    shape[axis] = -1
                info = np.iinfo(z.dtype)
                q = np.rint(w / s.reshape(shape)) + z.astype(np.int64).reshape(shape if z.ndim else [])
                codes = np.clip(q, info.min, info.max).astype(z.dtype)
                g.initializer.append(numpy_helper.from_array(codes, n.output[0]))
                replaced.add(n.input[0])
                continue
        keep.append(n)
    if replaced:
        del g.node[:]
        g.node.extend(keep)
        used = {i for n in g.node for i in n.input}
        alive = [i for i in g.initializer if i.name not in replaced or i.name in used]
        del g.initializer[:]
        g.initializer.extend(alive)
    return mp


def onnx_attr_tensor() -> int:
    import onnx

    return onnx.AttributeProto.TENSOR


@torch.no_grad()
def deploy_copy(model: nn.Module, style: str = "onnxruntime") -> nn.Module:
    """A copy of the quantized ``model`` with every quantizer frozen to torch's fake-quant ops (see the module
    docstring), in eval mode; equal to ``model`` in eval mode up to float32 rounding of the weights' grid values."""
    if style not in STYLES:
        raise ValueError(f"style={style!r}: choose one of {STYLES}")
    m = fold_conv_bn(copy.deepcopy(model)).eval()
    for p in m.parameters():  # a fake-quant of a tensor that needs grad is traced as the (unexportable) cachemask op
        p.requires_grad_(False)
    weight_slots: set[int] = set()
    found = 0
    for name, mod in list(m.named_modules()):
        wq = getattr(mod, "weight_quant", None)
        if isinstance(wq, Quantizer) and hasattr(mod, "quantized_weight"):
            where = f"layer {name!r}"
            weight_slots.add(id(wq))
            w = mod.quantized_weight().detach()
            if isinstance(mod, QConvTranspose2d):
                # the grid is in conv layout; the on-grid weight is exported as its float value
                _weight_grid(wq, where, style)
                mod.weight.data = w
                mod.weight_quant = None
            else:
                g = _weight_grid(wq, where, style)
                mod.weight.data = g.from_codes(g.to_codes(w)).to(w.dtype)
                mod.weight_quant = ExportWeightFQ(g, where)
            found += 1
        bq = getattr(mod, "bias_quant", None)
        if bq is not None and getattr(mod, "bias", None) is not None:
            mod.bias.data = bq(mod.bias.detach(), mod).to(mod.bias.dtype)
            mod.bias_quant = None
    for name, mod in list(m.named_modules()):
        for attr, child in list(mod.named_children()):
            where = f"quantizer {(name + '.' if name else '') + attr!r}"
            if isinstance(child, GradientQuantizer):
                setattr(mod, attr, nn.Identity())
            elif isinstance(child, Quantizer) and id(child) not in weight_slots:
                setattr(mod, attr, ExportActFQ(_act_grid(child, where, style), where))
                found += 1
    if not found:
        raise ValueError("the model has no quantizers; quantize it first (qcnn.quantize / qcnn ptq / qcnn qat)")
    return m


def _export(m: nn.Module, example: Tensor, dynamic: str, opset: int):
    """``torch.onnx.export(dynamo=True)`` with the dynamic dimensions of ``dynamic``; a failure is a ValueError with
    the exporter's first line."""
    shapes = None
    if dynamic != "none":
        dims = {0: torch.export.Dim("batch", min=1, max=4096)}
        if dynamic == "spatial":
            for d in range(2, example.dim()):
                dims[d] = torch.export.Dim(f"size{d}", min=8, max=4096)
        shapes = ({k: v for k, v in dims.items()},)
    try:
        return torch.onnx.export(m, (example,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                 optimize=True, verbose=False, report=False,
                                 custom_translation_table=_onnx_translations())
    except Exception as e:  # torch.export's guard / constraint errors are long; keep their first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (" (the graph fixes the input's height / width: export with dynamic='batch' / --dynamic batch)"
                if dynamic == "spatial" else "")
        raise ValueError(f"torch.onnx.export failed{hint}: {type(e).__name__}: {first[:300]}") from e


def to_onnx_torch(model: nn.Module, example: Tensor, path: str | Path | None = None, style: str = "onnxruntime",
                  dynamic: str = "auto", opset: int = 18):
    """Export the quantized ``model`` with torch's ONNX exporter (``dynamo=True``) as a QDQ graph (see the module
    docstring); returns the ``onnx.ModelProto`` (written to ``path`` if given).

    ``dynamic``: ``"spatial"`` makes batch, height and width dynamic (4-d inputs; the length of a 3-d Conv1d
    input), ``"batch"`` only the batch, ``"none"`` nothing; ``"auto"`` (default) is ``spatial`` where the model
    runs on another input size and ``batch`` where its graph fixes the size (a flatten into a fixed-size linear
    layer, or a size guard torch.export proves, e.g. ceil-mode pooling: then with a warning). ``spatial`` on such
    a model is refused with that advice. The choice made is in the model's metadata
    (``qcnn_dynamic``)."""
    import onnx

    if dynamic not in ("auto", "spatial", "batch", "none"):
        raise ValueError(f"dynamic={dynamic!r}: choose auto, spatial, batch or none")
    m = deploy_copy(model, style)
    auto = dynamic == "auto"
    err = _runs_on_another_size(m, example) if dynamic in ("auto", "spatial") and example.dim() > 2 else None
    if auto:
        dynamic = "spatial" if example.dim() > 2 and err is None else "batch"
    if dynamic == "spatial" and err is not None:
        raise ValueError(f"the model does not run on another input size ({err}), so its height / width cannot "
                         "be dynamic: export with dynamic='batch' (qcnn export --dynamic batch)")
    try:
        prog = _export(m, example, dynamic, opset)
    except ValueError as e:
        if not (auto and dynamic == "spatial"):
            raise
        # torch.export proved a size guard the trial run could not see (e.g. ceil-mode pooling on odd sizes):
        # auto falls back to a dynamic batch only
        warnings.warn(f"dynamic height / width failed to export ({str(e).strip().splitlines()[0][:200]}); "
                      "exported with a dynamic batch only", stacklevel=2)
        dynamic = "batch"
        prog = _export(m, example, dynamic, opset)
    mp = _fold_constant_quantize(prog.model_proto)
    onnx.helper.set_model_props(mp, {**{p.key: p.value for p in mp.metadata_props}, "qcnn_dynamic": dynamic,
                                     "qcnn_style": style})
    onnx.checker.check_model(mp)
    if path is not None:
        write_model(mp, path)
    return mp


__all__ = ["STYLES", "ExportActFQ", "ExportWeightFQ", "deploy_copy", "to_onnx_torch"]

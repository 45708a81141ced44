"""Reference kernels of the integer operations (int64 tensors in, int64 tensors out).

Every kernel has the one signature ``kernel(op, inputs, cache) -> Tensor``: the :class:`~qcnn.integer.ir.Op`,
the list of its input tensors (in ``op.inputs`` order) and a per-model cache (prepared weights, keyed by
``id(op)``). :data:`KERNELS` maps an op kind to its kernel; :func:`run_op` dispatches. ``requant`` and ``add``
run the scheme they were compiled with (:mod:`qcnn.integer.schemes`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qcnn.integer.ir import Op, index_from_json
from qcnn.integer.schemes import scheme_of

Kernel = Callable[[Op, list[Tensor], dict], Tensor]
#: op kind -> kernel
KERNELS: dict[str, Kernel] = {}


def kernel(*kinds: str) -> Callable[[Kernel], Kernel]:
    """Register the decorated function as the kernel of the op ``kinds``."""
    def register(fn: Kernel) -> Kernel:
        for k in kinds:
            KERNELS[k] = fn
        return fn
    return register


def run_op(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    """Output of ``op`` on ``inputs``."""
    fn = KERNELS.get(op.kind)
    if fn is None:
        raise ValueError(f"unknown integer operation {op.kind!r} (value {op.output!r})")
    return fn(op, inputs, cache)


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


def _signed_centred_weight(op: Op, device, cache: dict) -> Tensor:
    """``sign * (w - z_w)`` of a conv / linear op as int64 (prepared once per model)."""
    w = cache.get(id(op))
    if w is None:
        t = op.tensors
        shape = [-1] + [1] * (t["weight"].dim() - 1)
        w = (t["weight"].to(torch.int64) - t["weight_zero_point"].to(torch.int64).reshape(shape))
        w = (w * t["sign"].to(torch.int64).reshape(shape)).to(device)
        cache[id(op)] = w
    return w


@kernel("conv")
def _conv(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x, a = inputs[0], op.attrs
    w = _signed_centred_weight(op, x.device, cache)
    acc = int_conv2d(x - a["input_zero_point"], w, a["stride"], a["padding"], a["dilation"], a["groups"])
    return acc + op.tensors["bias"].to(x.device, torch.int64).reshape(1, -1, 1, 1)


@kernel("linear")
def _linear(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x = inputs[0]
    w = _signed_centred_weight(op, x.device, cache)
    xc = x - op.attrs["input_zero_point"]
    acc = torch.matmul(xc.to(torch.float64), w.to(torch.float64).t()).to(torch.int64)
    return acc + op.tensors["bias"].to(x.device, torch.int64)


@kernel("requant", "add")
def _requantize(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    return scheme_of(op).apply(op, inputs)


@kernel("quantize")
def _quantize(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    a = op.attrs
    xf = inputs[0].double()  # the exact product x * fl32(1/s), as the float64 simulation rounds it
    if a.get("lo_real") is not None or a.get("hi_real") is not None:
        xf = torch.clamp(xf, a.get("lo_real"), a.get("hi_real"))
    q = torch.round(xf * a["inv_scale"]).to(torch.int64) + a["zero_point"]
    return torch.clamp(q, a["qmin"], a["qmax"])


@kernel("clamp")
def _clamp(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x, t = inputs[0], op.tensors
    if "pre_shift" in t:
        x = torch.bitwise_left_shift(x, t["pre_shift"].to(x.device))
    if "add" in t:
        x = x + t["add"].to(x.device)
    if "lo" in t:
        x = torch.maximum(x, t["lo"].to(x.device))
    if "hi" in t:
        x = torch.minimum(x, t["hi"].to(x.device))
    return x


def ceil_extra(size: int, k: int, s: int, p: int, d: int) -> int:
    """Rows (columns) added after the padded input so that a ``ceil_mode`` pool's last window fits: PyTorch's
    output size ``ceil((size + 2p - d(k-1) - 1) / s) + 1``, minus one where that window would start in the
    right padding."""
    span = size + 2 * p - d * (k - 1) - 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p:
        out -= 1
    return max(0, (out - 1) * s - span)


@kernel("maxpool")
def _maxpool(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    a = op.attrs
    x, k, s, p, d = inputs[0], a["kernel"], a["stride"], a["padding"], a["dilation"]
    low = -(2**62)
    if a.get("ceil_mode"):  # windows past the end see only the padding value, as PyTorch's -inf
        eh, ew = (ceil_extra(x.shape[-2 + i], k[i], s[i], p[i], d[i]) for i in range(2))
        x = F.pad(x, (p[1], p[1] + ew, p[0], p[0] + eh), value=low)
        p = [0, 0]
    out = None
    for _, _, xs in _windows(x, k, s, p, d, low):
        out = xs if out is None else torch.maximum(out, xs)
    return out


@kernel("sumpool")
def _sumpool(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    a = op.attrs
    x = inputs[0] - a.get("input_zero_point", 0)
    if a.get("global"):
        return x.sum(dim=(-2, -1), keepdim=True)
    out = None
    for _, _, xs in _windows(x, a["kernel"], a["stride"], a["padding"], [1, 1], 0):
        out = xs if out is None else out + xs
    return out


@kernel("reshape")
def _reshape(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x = inputs[0]
    return x.reshape([x.shape[0]] + list(op.attrs["shape"]))


@kernel("getitem")
def _getitem(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    return inputs[0][index_from_json(op.attrs["index"])]


@kernel("pad")
def _pad(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    return F.pad(inputs[0], op.attrs["pad"], value=op.attrs["value"])


@kernel("concat")
def _concat(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    return torch.cat(inputs, op.attrs["dim"])


@kernel("mul")
def _mul(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    za, zb = op.attrs["input_zero_points"]
    return (inputs[0] - za) * (inputs[1] - zb)


@kernel("affine")
def _affine(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x = inputs[0]
    sign = op.tensors["sign"].to(x.device, torch.int64).reshape([1, -1] + [1] * (x.dim() - 2))
    return (x - op.attrs["input_zero_point"]) * sign


@kernel("lut")
def _lut(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x = inputs[0]
    table = op.tensors["table"].to(x.device, torch.int64)
    return table[x - op.attrs["input_qmin"]]


@kernel("permute")
def _permute(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    return inputs[0].permute(op.attrs["dims"])


@kernel("dequantize")
def _dequantize(op: Op, inputs: list[Tensor], cache: dict) -> Tensor:
    x = inputs[0] - op.attrs.get("zero_point", 0)
    y = x.to(torch.float64) * op.tensors["scale"].to(x.device)
    if "offset" in op.tensors:
        y = y + op.tensors["offset"].to(x.device)
    return y.float()


__all__ = ["KERNELS", "Kernel", "int_conv2d", "kernel", "run_op"]

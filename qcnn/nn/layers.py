"""Quantized layers. They hold quantizers and nothing else: all the math lives in :mod:`qcnn.quant`.

``QConv1d`` / ``QConv2d`` / ``QConvTranspose2d`` / ``QLinear`` subclass their float layer (same parameters and
state_dict keys) and compute::

    y = out_quant( op( input_quant(x), weight_quant(W), bias_quant(b, layer) ) )

where every slot is optional (``None`` = identity; ``bias_quant`` is an attribute set after construction, e.g.
by :func:`qcnn.integer.add_bias_quantizers`, and receives the layer to read its input and weight grids).
``out_quant`` is for modules that act on the layer output, e.g. a :class:`~qcnn.quant.base.GradientQuantizer`
(identity forward, quantized backward).
``QAdd`` replaces a residual ``a + b`` and quantizes its output (integer-only inference needs it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _copy_param_refs(dst: nn.Module, src: nn.Module) -> None:
    dst.weight = src.weight
    dst.bias = src.bias


class _QuantSlots:
    input_quant: nn.Module | None
    weight_quant: nn.Module | None
    out_quant: nn.Module | None

    def _init_slots(self, input_quant=None, weight_quant=None, out_quant=None):
        self.input_quant = input_quant
        self.weight_quant = weight_quant
        self.out_quant = out_quant

    def quantized_weight(self) -> Tensor:
        return self.weight_quant(self.weight) if self.weight_quant is not None else self.weight

    def quantized_bias(self) -> Tensor | None:
        bq = getattr(self, "bias_quant", None)
        return bq(self.bias, self) if bq is not None and self.bias is not None else self.bias

    def _pre(self, x: Tensor) -> Tensor:
        return self.input_quant(x) if self.input_quant is not None else x

    def _post(self, y: Tensor) -> Tensor:
        return self.out_quant(y) if self.out_quant is not None else y


class _QConvNd(_QuantSlots):
    """``from_float`` and ``forward`` shared by the quantized Conv1d / Conv2d (same constructor arguments)."""

    @classmethod
    def from_float(cls, conv, input_quant=None, weight_quant=None, out_quant=None):
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        _copy_param_refs(q, conv)
        q._init_slots(input_quant, weight_quant, out_quant)
        q.train(conv.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._post(self._conv_forward(self._pre(x), self.quantized_weight(), self.quantized_bias()))


class QConv2d(_QConvNd, nn.Conv2d):
    """Conv2d with input, weight and output quantizer slots."""


class QLinear(_QuantSlots, nn.Linear):
    """Linear with input, weight and output quantizer slots."""

    @classmethod
    def from_float(cls, lin: nn.Linear, input_quant=None, weight_quant=None, out_quant=None) -> QLinear:
        q = cls(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            device=lin.weight.device,
            dtype=lin.weight.dtype,
        )
        _copy_param_refs(q, lin)
        q._init_slots(input_quant, weight_quant, out_quant)
        q.train(lin.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._post(F.linear(self._pre(x), self.quantized_weight(), self.quantized_bias()))


class QConv1d(_QConvNd, nn.Conv1d):
    """Conv1d with input, weight and output quantizer slots (weight ``(out, in/groups, k)``: per-channel is axis 0)."""


def transposed_to_conv_layout(w: Tensor, groups: int) -> Tensor:
    """A ConvTranspose weight ``(in, out/groups, *k)`` in the layout of an ordinary conv, ``(out, in/groups, *k)``:
    output channel ``o = g * out/groups + j`` of group ``g`` is row ``o``."""
    cin, cog = w.shape[0], w.shape[1]
    return w.reshape(groups, cin // groups, cog, *w.shape[2:]).transpose(1, 2).reshape(
        groups * cog, cin // groups, *w.shape[2:])


def conv_to_transposed_layout(w: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`transposed_to_conv_layout`: ``(out, in/groups, *k)`` back to ``(in, out/groups, *k)``."""
    cout, cig = w.shape[0], w.shape[1]
    return w.reshape(groups, cout // groups, cig, *w.shape[2:]).transpose(1, 2).reshape(
        groups * cig, cout // groups, *w.shape[2:])


class QConvTranspose2d(_QuantSlots, nn.ConvTranspose2d):
    """ConvTranspose2d with input, weight and output quantizer slots.

    The weight is stored as ``(in, out/groups, kH, kW)``, so its output channels are axis 1. The weight quantizer
    is given it in the layout of an ordinary conv, ``(out, in/groups, kH, kW)``
    (:func:`transposed_to_conv_layout`), so that a per-channel quantizer (axis 0, as on every other layer) has one
    scale per output channel; ``weight_quant.grid()`` describes that layout, and :meth:`quantized_weight` returns
    the stored one (with ``groups=1``: ``scale[o]`` is the step of ``quantized_weight()[:, o]``)."""

    @classmethod
    def from_float(cls, conv: nn.ConvTranspose2d, input_quant=None, weight_quant=None,
                   out_quant=None) -> QConvTranspose2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            output_padding=conv.output_padding,
            groups=conv.groups,
            bias=conv.bias is not None,
            dilation=conv.dilation,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        _copy_param_refs(q, conv)
        q._init_slots(input_quant, weight_quant, out_quant)
        q.train(conv.training)
        return q

    def quantized_weight(self) -> Tensor:
        if self.weight_quant is None:
            return self.weight
        return conv_to_transposed_layout(self.weight_quant(transposed_to_conv_layout(self.weight, self.groups)),
                                         self.groups)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        y = F.conv_transpose2d(self._pre(x), self.quantized_weight(), self.quantized_bias(), self.stride, self.padding,
                               output_padding, self.groups, self.dilation)
        return self._post(y)


class QAdd(nn.Module):
    """Residual add ``out_quant(a + b)``."""

    def __init__(self, out_quant: nn.Module | None = None):
        super().__init__()
        self.out_quant = out_quant

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a + b
        return self.out_quant(y) if self.out_quant is not None else y


class ChannelClamp(nn.Module):
    """``clamp(x, 0, upper[c])`` with one upper bound per channel (dim 1): a ReLU6 whose channels were
    rescaled by cross-layer equalization (``relu6(x) / s_c = clamp(x / s_c, 0, 6 / s_c)``), so that the
    equalized network computes exactly the function of the original one."""

    def __init__(self, upper: Tensor):
        super().__init__()
        self.register_buffer("upper", upper.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        up = self.upper.to(x.dtype).reshape(1, -1, *[1] * (x.dim() - 2))
        return torch.minimum(x.clamp(min=0), up)

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


#: float layer type -> its quantized layer (subclasses of a float type get the same quantized layer)
QUANT_LAYERS = {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.ConvTranspose2d: QConvTranspose2d, nn.Linear: QLinear}
#: every quantized weight layer
QUANTIZED_LAYERS = (QConv1d, QConv2d, QConvTranspose2d, QLinear)


class QConvBn2d(QConv2d):
    """QConv2d followed by a frozen BatchNorm2d, computed as one conv with the folded, quantized weight.

    Holds the conv parameters (``weight``, ``bias``) and the BatchNorm module ``bn`` (``gamma``, ``beta``
    trainable; running statistics frozen, used in training and evaluation alike).
    """

    bn: nn.BatchNorm2d

    @classmethod
    def from_qconv(cls, conv: QConv2d, bn: nn.BatchNorm2d) -> QConvBn2d:
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError("QConvBn2d needs a BatchNorm2d with running statistics (track_running_stats=True)")
        q = cls.from_float(conv, conv.input_quant, conv.weight_quant, conv.out_quant)
        q.bn = bn
        return q

    def folded(self) -> tuple[Tensor, Tensor]:
        """(folded weight ``W gamma / sigma``, folded bias ``beta + (b - mean) gamma / sigma``)."""
        bn = self.bn
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
        f = gamma / sigma
        b = self.bias if self.bias is not None else torch.zeros_like(sigma)
        return self.weight * f.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * f

    def quantized_weight(self) -> Tensor:
        w, _ = self.folded()
        return self.weight_quant(w) if self.weight_quant is not None else w

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.folded()
        wq = self.weight_quant(w) if self.weight_quant is not None else w
        return self._post(F.conv2d(self._pre(x), wq, b, self.stride, self.padding, self.dilation, self.groups))

    def to_qconv(self) -> QConv2d:
        """A plain QConv2d with the folded weight and bias (same quantizers, same output)."""
        with torch.no_grad():
            w, b = self.folded()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        q = QConv2d.from_float(conv, self.input_quant, self.weight_quant, self.out_quant)
        return q.train(self.training)


# -- tensor ops put on the graph by qcnn.transform.quantize_adds: concatenation, products, activations ----------
# (like QAdd: a module per graph node, with an ``out_quant`` slot that gives integer inference the output grid)
class QCat(nn.Module):
    """Concatenation ``out_quant(torch.cat(xs, dim))``: every input lands on the one output grid."""

    def __init__(self, out_quant: nn.Module | None = None, dim: int = 1):
        super().__init__()
        self.out_quant = out_quant
        self.dim = dim

    def forward(self, *xs: Tensor) -> Tensor:
        y = torch.cat(xs, self.dim)
        return self.out_quant(y) if self.out_quant is not None else y

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class QMul(nn.Module):
    """Elementwise product of two tensors ``out_quant(a * b)`` (broadcasting: squeeze-excitation gates)."""

    def __init__(self, out_quant: nn.Module | None = None):
        super().__init__()
        self.out_quant = out_quant

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        y = a * b
        return self.out_quant(y) if self.out_quant is not None else y


class QAct(nn.Module):
    """Elementwise activation on quantized values ``out_quant(act(input_quant(x)))`` (Hardswish, Hardsigmoid,
    SiLU, Sigmoid, Tanh, LeakyReLU; ``act=None``: identity, a plain quantization point). Integer inference runs it as a
    lookup table from input codes to output codes; ``input_quant`` is None where the input already is codes
    (the output of another quantized op)."""

    def __init__(self, act: nn.Module | None = None, input_quant: nn.Module | None = None,
                 out_quant: nn.Module | None = None):
        super().__init__()
        self.act = act
        self.input_quant = input_quant
        self.out_quant = out_quant

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quant(x) if self.input_quant is not None else x
        y = self.act(x) if self.act is not None else x
        return self.out_quant(y) if self.out_quant is not None else y

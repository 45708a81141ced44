"""Quantized layers. They hold quantizers and nothing else: all the math lives in :mod:`qcnn.quant`.

``QConv2d`` / ``QLinear`` subclass ``nn.Conv2d`` / ``nn.Linear`` (same parameters and state_dict keys)
and compute::

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


class QConv2d(_QuantSlots, nn.Conv2d):
    """Conv2d with input, weight and output quantizer slots."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_quant=None, weight_quant=None, out_quant=None) -> QConv2d:
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


QUANT_LAYERS = {nn.Conv2d: QConv2d, nn.Linear: QLinear}
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



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


QUANT_LAYERS = {nn.Conv2d: QConv2d, nn.Linear: QLinear}

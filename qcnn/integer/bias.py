"""Bias quantization to the int32 accumulator grid (Jacob et al., arXiv 1712.05877, section 2.4).

Integer kernels (ONNX Runtime's QLinearConv/QGemm, TFLite, gemmlowp) add the bias to the int32 accumulator, so
they use the bias rounded to accumulator units::

    b_q = s_x s_w clamp(round(b / (s_x s_w)), -2^31, 2^31 - 1)      (s_w per output channel)

:class:`AccumulatorBias` makes the fake-quant simulation use exactly that bias (the ``bias_quant`` slot of
``QConv2d`` / ``QLinear``), so that a deployed integer kernel and the simulation differ only by float
rounding near ties, not by the bias rounding (up to half an accumulator unit, which is a sizeable fraction
of an output step for narrow weight and activation grids). The float bias is passed through while the
input or weight quantizer is not calibrated yet, or its grid is not uniform per tensor (input) / along
axis 0 (weights). The rounding is a straight-through estimator in training (``b_q`` forward, identity
gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Quantizer


def _uniform_grid(q, per_tensor: bool):
    if not isinstance(q, Quantizer) or not q.is_initialized():
        return None
    g = q.grid().integer_view()
    if g is None or g.scale is None:
        return None
    if per_tensor and g.scale.numel() != 1:
        return None
    if not per_tensor and g.scale.numel() != 1 and g.axis not in (None, 0):
        return None
    return g


class AccumulatorBias(nn.Module):
    """``bias_quant`` slot: the bias on the accumulator grid ``s_x s_w`` of its layer (int32 codes)."""

    def forward(self, bias: Tensor, layer: nn.Module) -> Tensor:
        gx = _uniform_grid(getattr(layer, "input_quant", None), True)
        gw = _uniform_grid(getattr(layer, "weight_quant", None), False)
        if gx is None or gw is None:
            return bias
        s_x = gx.scale.detach().to(torch.float32).reshape(()).to(torch.float64)
        s_w = gw.scale.detach().to(torch.float32).reshape(-1).to(torch.float64).to(bias.device)
        s = (s_x.to(bias.device) * s_w).expand(bias.shape[0])
        codes = torch.clamp(torch.round(bias.detach().to(torch.float64) / s), -(2**31), 2**31 - 1)
        bq = (codes * s).to(bias.dtype)
        return bias + (bq - bias).detach()


@torch.no_grad()
def add_bias_quantizers(model: nn.Module) -> nn.Module:
    """Put an :class:`AccumulatorBias` in the ``bias_quant`` slot of every quantized conv / linear with a bias
    (in place; returns ``model``). Call it before calibration so that the activation ranges see the rounded
    biases."""
    if not isinstance(model, fx.GraphModule):
        raise ValueError("add_bias_quantizers needs the torch.fx GraphModule made by qcnn.quantize")
    n = 0
    for mod in model.modules():
        if isinstance(mod, (QConv2d, QLinear)) and mod.bias is not None:
            mod.bias_quant = AccumulatorBias()
            n += 1
    if n == 0:
        raise ValueError("no quantized conv / linear layer with a bias (fold BatchNorm first: fold_bn=True)")
    return model


__all__ = ["AccumulatorBias", "add_bias_quantizers"]

"""WRPN's policy: clipped low-bit weights and activations on hidden layers of a widened network
(``--width``), int8 edges. The quantizers are :mod:`qcnn.quant.wrpn`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcnn.methods.base import EdgeUniformMethod, LayerContext, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.dorefa import DoReFaActivation
from qcnn.quant.wrpn import SCALES, WRPNWeight


@dataclass
class WRPNOptions:
    #: k > 1 weights: ``none`` (clip the raw weights to [-1, 1], paper) or ``max`` (grid on [-max|w|, max|w|])
    weight_scale: str = "none"
    #: 1-bit weights: ``mean`` (sign(w) mean|w|), ``max`` or ``none`` (+-1)
    binary_scale: str = "mean"


@register_method
class WRPNMethod(EdgeUniformMethod):
    """WRPN: unsigned clip-to-[0,1] activations, signed clip-to-[-1,1] weights; widen with ``width``."""

    name = "wrpn"
    Options = WRPNOptions

    def __init__(self, options=None):
        super().__init__(options)
        for name in ("weight_scale", "binary_scale"):
            v = getattr(self.options, name)
            if v not in SCALES:
                raise ValueError(f"{name}={v!r} is not one of {SCALES}")

    def low_weight(self, ctx: LayerContext) -> Quantizer:
        return WRPNWeight(ctx.w_bits, self.options.weight_scale, self.options.binary_scale, ctx.per_channel)

    def low_act(self, ctx: LayerContext) -> Quantizer:
        return DoReFaActivation(ctx.a_bits, signed=ctx.input_signed)


__all__ = ["WRPNMethod", "WRPNOptions"]

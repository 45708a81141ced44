"""The efficient non-uniform quantizer's policy: k-quantile levels on weights and activations (the level
sets follow training). The quantizers are :mod:`qcnn.quant.nonuniform`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.nonuniform import QuantileActQuantizer, QuantileWeightQuantizer


@dataclass
class NonUniformOptions:
    #: bits of the integers that represent the levels (single scale per tensor)
    int_bits: int = 8
    #: use the integer-representable levels ``scale * n_i`` in the forward pass
    snap: bool = True
    #: calibration samples kept per activation quantizer
    max_samples: int = 1 << 18
    #: EMA momentum of the activation levels in training (None: levels fixed after calibration)
    track_momentum: float | None = 0.9
    #: training-mode calls between two Gaussian fits of the weight levels (1: every call, exact resume; N > 1
    #: skips the fit in between, see QuantileWeightQuantizer)
    refresh_every: int = 1


@register_method
class NonUniformMethod(Method):
    """k-quantile weights (Gaussian fit) and activations (empirical), single-scale integer levels."""

    name = "nonuniform"
    Options = NonUniformOptions

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        o = self.options
        return QuantileWeightQuantizer(ctx.w_bits, max(o.int_bits, ctx.w_bits), o.snap, refresh_every=o.refresh_every)

    def _act(self, bits: int, signed: bool) -> Quantizer:
        o = self.options
        return QuantileActQuantizer(bits, signed, max(o.int_bits, bits), o.snap, o.max_samples,
                                    track_momentum=o.track_momentum)

    def act_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return self._act(ctx.a_bits, ctx.input_signed)

    def input_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return self._act(ctx.a_bits, True)


__all__ = ["NonUniformMethod", "NonUniformOptions"]

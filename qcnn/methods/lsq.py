"""LSQ's policy: learned-step quantizers on weights, activations and the network input (first/last layers
too, at 8 bits, as in the paper). The quantizer is :mod:`qcnn.quant.lsq`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.lsq import LSQQuantizer


@dataclass
class LSQOptions:
    #: multiply the step gradient by 1/sqrt(N Q_P) (paper); False: plain gradient
    grad_scale: bool = True
    #: quantize first/last layers (at their recipe bits) with LSQ as the paper does; False: uniform int8 grid
    lsq_first_last: bool = True
    #: step init: ``paper`` (2 mean|x| / sqrt(Q_P)) or ``mse`` (MSE-optimal step of weights and activations, LSQ+)
    init: str = "paper"


@register_method
class LSQMethod(Method):
    """LSQ on weights (signed, per layer or per output channel), activations and the network input."""

    name = "lsq"
    Options = LSQOptions
    #: signed 1-bit data has no LSQ grid
    weight_bits = tuple(range(2, 17))

    def _edge_uniform(self, ctx: LayerContext) -> bool:
        return ctx.role != "hidden" and not self.options.lsq_first_last

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer:
        if self._edge_uniform(ctx):
            return super().weight_quantizer(ctx)
        return LSQQuantizer(ctx.w_bits, signed=True, per_channel=ctx.per_channel, activation=False,
                            init=ctx.module.weight, grad_scale=self.options.grad_scale, init_rule=self.options.init)

    def act_quantizer(self, ctx: LayerContext) -> Quantizer:
        if self._edge_uniform(ctx):
            return super().act_quantizer(ctx)
        return LSQQuantizer(ctx.a_bits, signed=ctx.input_signed, grad_scale=self.options.grad_scale,
                            init_rule=self.options.init)

    def input_quantizer(self, ctx: LayerContext) -> Quantizer:
        if self._edge_uniform(ctx):
            return super().input_quantizer(ctx)
        return LSQQuantizer(ctx.a_bits, signed=True, grad_scale=self.options.grad_scale, init_rule=self.options.init)


__all__ = ["LSQMethod", "LSQOptions"]

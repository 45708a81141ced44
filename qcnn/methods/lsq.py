"""LSQ's policy: learned-step quantizers on weights, activations and the network input (first/last layers
too, at 8 bits, as in the paper). The quantizer is :mod:`qcnn.quant.lsq`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
    #: learning rate of the steps (their own optimiser group, no weight decay); None: the recipe's lr. With Adam
    #: the paper's gradient scale cancels out and each step moves by about ``lr`` per update whatever its size
    #: (an 8-bit weight step of 0.003 by 15 % at lr 5e-4): a smaller ``step_lr`` keeps the relative moves small
    step_lr: float | None = None


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

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict] | None:
        """With ``step_lr``: every learned step in a group of its own at that rate, not decayed."""
        if self.options.step_lr is None:
            return None
        steps = [m.step for m in model.modules() if isinstance(m, LSQQuantizer) and m.step.requires_grad]
        return self.own_group(model, weight_decay, steps, weight_decay=0.0, lr=self.options.step_lr)


__all__ = ["LSQMethod", "LSQOptions"]

"""PACT's policy: learned-clip activations and DoReFa weights on hidden layers, alpha in its own optimiser
group with the paper's L2 (``alpha_decay``). The quantizer is :mod:`qcnn.quant.pact`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qcnn.methods.base import EdgeUniformMethod, LayerContext, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.dorefa import DoReFaWeight
from qcnn.quant.pact import PACTQuantizer


@dataclass
class PACTOptions:
    #: initial clip level (paper: 10 on CIFAR-10)
    alpha_init: float = 10.0
    #: L2 regularisation of alpha (paper: 2e-4), in its own optimiser group
    alpha_decay: float = 2e-4
    #: if set, initialise alpha from this percentile of |x| over the calibration data instead of alpha_init
    init_percentile: float | None = None
    #: initialise alpha to minimise the quantization MSE on the calibration data (overrides the two above; the
    #: default, as a fine-tuned or calibrated network's activations are far below the paper's 10; false = 10)
    init_mse: bool = True
    #: initialise alpha to 2 sqrt(n) mean|x| over the calibration data (overrides all the above)
    init_mean: bool = False
    #: clip(x, -alpha, alpha) on activations that can be negative; False uses clip(x, 0, alpha) everywhere
    signed_variant: bool = True
    #: DoReFa weights multiplied by max|w| (see qcnn.quant.dorefa; keeps BatchNorm statistics valid; false = the
    #: paper's w_q in [-1, 1], which inflates every conv output ~1/max|w| and kills a pretrained net's eval BN)
    weight_rescale: bool = True
    #: learning rate of the alpha group (None: the recipe's lr)
    alpha_lr: float | None = None


@register_method
class PACTMethod(EdgeUniformMethod):
    """PACT activations (signed variant where the input can be negative) with DoReFa weights."""

    name = "pact"
    Options = PACTOptions

    def low_weight(self, ctx: LayerContext) -> Quantizer:
        return DoReFaWeight(ctx.w_bits, rescale=self.options.weight_rescale)

    def low_act(self, ctx: LayerContext) -> Quantizer:
        o = self.options
        return PACTQuantizer(ctx.a_bits, signed=ctx.input_signed and o.signed_variant, alpha_init=o.alpha_init,
                             init_percentile=o.init_percentile, init_mse=o.init_mse,
                             init_mean=o.init_mean)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict]:
        """The default groups (decay on conv/linear kernels only) with every alpha in a group of its own,
        decayed by ``alpha_decay`` (the paper's L2 on alpha) and optionally on its own learning rate
        (``alpha_lr``)."""
        alphas = [m.alpha for m in model.modules() if isinstance(m, PACTQuantizer) and m.alpha.requires_grad]
        lr = {} if self.options.alpha_lr is None else {"lr": self.options.alpha_lr}
        return self.own_group(model, weight_decay, alphas, weight_decay=self.options.alpha_decay, **lr)


__all__ = ["PACTMethod", "PACTOptions"]

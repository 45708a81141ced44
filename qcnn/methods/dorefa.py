"""DoReFa-Net's policy: tanh/sign weights and clipped activations on hidden layers, int8 edges.

The quantizers are :mod:`qcnn.quant.dorefa`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcnn.methods.base import EdgeUniformMethod, LayerContext, register_method
from qcnn.quant.base import GradientQuantizer, Quantizer, check_bits
from qcnn.quant.dorefa import DoReFaActivation, DoReFaGradQuantizer, DoReFaWeight


@dataclass
class DoReFaOptions:
    #: also quantize the gradients at the first and last layers' outputs (the paper leaves them float)
    grad_first_last: bool = False
    #: multiply the k>1 weights by max|w| (keeps a float checkpoint's BatchNorm statistics valid; false = the
    #: paper's w_q in [-1, 1])
    weight_rescale: bool = True
    #: scale the pretrained network's residual stream by this factor before training (function kept, see
    #: qcnn.methods.equalize.scale_residual_stream) so that clip(a, 0, 1) does not cut the block inputs; None = off
    stream_scale: float | None = None


@register_method
class DoReFaMethod(EdgeUniformMethod):
    """DoReFa-Net: tanh/sign weights, ``quantize_k(clip(a,0,1))`` activations, optional k_G-bit gradients
    (``recipe.g_bits``) on every hidden conv/linear output."""

    name = "dorefa"
    Options = DoReFaOptions

    def low_weight(self, ctx: LayerContext) -> Quantizer:
        return DoReFaWeight(ctx.w_bits, rescale=self.options.weight_rescale)

    def low_act(self, ctx: LayerContext) -> Quantizer:
        return DoReFaActivation(ctx.a_bits, signed=ctx.input_signed)

    def grad_quantizer(self, ctx: LayerContext) -> GradientQuantizer | None:
        if ctx.g_bits is None or (ctx.role != "hidden" and not self.options.grad_first_last):
            return None
        return DoReFaGradQuantizer(check_bits(ctx.g_bits, "g_bits"))


__all__ = ["DoReFaMethod", "DoReFaOptions"]

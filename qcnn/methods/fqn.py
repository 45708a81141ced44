"""FQN training procedure (Li et al., CVPR 2019; BN folding of Jacob et al., arXiv 1712.05877).

1. ``quantize`` with BatchNorm kept (``keep_bn``), then every ``QConv2d -> BatchNorm2d`` pair becomes a
   :class:`~qcnn.nn.layers.QConvBn2d`: the folded weight ``W gamma / sigma`` is quantized, the unfolded
   ``W``, ``gamma``, ``beta`` are trained, the running statistics stay frozen.
2. Calibrate the EMA activation ranges on the held-out calibration split, then train (the EMA keeps
   tracking batch min/max, gamma = 0.999).
   With ``calib: mse`` (recipe ``fqn_mse``) the range is instead calibrated with the MSE observer and tracked
   in training as the EMA (same gamma) of each batch's MSE-optimal range (:func:`qcnn.quant.uniform.mse_range`),
   so that the 4-bit grid is not stretched to rare large values: on the leaky-ReLU detector the min/max range
   of the first leaky-ReLU output is [-1.5, 15.1] (99th percentile 3.3), a step of 1.11 and 7.1 dB SQNR.
3. Fold: every QConvBn2d becomes a plain QConv2d with the folded weight and bias, the structure that
   ``quantize(model, recipe)`` builds for the ``fqn`` method, so the checkpoint reloads with
   :func:`qcnn.checkpoint.load_model` and compiles with :func:`qcnn.integer.to_integer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qcnn.methods import calibrate, register_procedure, train_quantized
from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.methods.place import quantize
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe
from qcnn.transform import attach_bn, fold_bn, fold_conv_bn


@dataclass
class FQNOptions:
    #: EMA factor of the activation range estimator
    gamma: float = 0.999
    #: keep BatchNorm modules unfolded after ``quantize`` (the fqn procedure then trains them folded with
    #: frozen statistics through QConvBn2d); False folds BN into the convs with its eval statistics
    keep_bn: bool = False


@register_method
class FQNMethod(Method):
    """FQN quantizers: asymmetric per-channel min/max weights, asymmetric EMA activation ranges (of batch
    min/max with ``calib`` ``ema``/``minmax``, of per-batch MSE ranges with ``mse``)."""

    requires_quantized_activations = True
    name = "fqn"
    Options = FQNOptions

    def weight_quantizer(self, ctx: LayerContext) -> UniformQuantizer:
        return UniformQuantizer(ctx.w_bits, signed=True, symmetric=False, per_channel=ctx.per_channel,
                                dynamic=True)

    def calibrated_act(self, bits: int, signed: bool, calib: str) -> UniformQuantizer:
        # the EMA observer averages batch min/max with its own gamma; the MSE one is tracked by an EMA of
        # per-batch MSE ranges with momentum gamma
        ranges = {"ema": dict(observer="ema", gamma=self.options.gamma),
                  "minmax": dict(observer="ema", gamma=self.options.gamma),
                  "mse": dict(observer="mse", track_momentum=self.options.gamma)}
        if calib in ranges:
            return UniformQuantizer(bits, signed=signed, symmetric=False, track_in_training=True, **ranges[calib])
        raise ValueError(f"fqn: calib={calib!r} is not an FQN activation range: choose 'ema' (EMA of batch "
                         "min/max, the paper's) or 'mse' (EMA of per-batch MSE-optimal ranges)")

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.options.keep_bn:
            return model
        return fold_bn(model)



def prepare_fqn(model: nn.Module, recipe: Recipe) -> nn.Module:
    """The trainable FQN model: quantized, with QConvBn2d where a conv is followed by BatchNorm."""
    params = dict(recipe.params)
    params["keep_bn"] = True
    device = next(model.parameters()).device
    qmodel = quantize(model.eval(), recipe.replace(params=params, fold_bn=False)).to(device)
    if hasattr(qmodel, "graph"):
        attach_bn(qmodel)
    return qmodel


@register_procedure("fqn")
def fqn(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
        resume: bool = False) -> tuple[nn.Module, dict]:
    """Quantize, calibrate, train with folded frozen BN, then fold for integer inference."""
    qmodel = prepare_fqn(model, recipe)
    calibrate(qmodel, bundle.calib, recipe.calib_images)
    metrics = train_quantized(qmodel, bundle, recipe, out_dir, resume)
    fold_conv_bn(qmodel)
    return qmodel.eval(), metrics


__all__ = ["fqn", "prepare_fqn"]

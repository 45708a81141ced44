"""FQN training procedure (Li et al., CVPR 2019; BN folding of Jacob et al., arXiv 1712.05877).

1. ``quantize`` with BatchNorm kept (``keep_bn``), then every ``QConv2d -> BatchNorm2d`` pair becomes a
   :class:`~qcnn.quant.fqn.QConvBn2d`: the folded weight ``W gamma / sigma`` is quantized, the unfolded
   ``W``, ``gamma``, ``beta`` are trained, the running statistics stay frozen.
2. Calibrate the EMA activation ranges on the held-out calibration split, then train (the EMA keeps
   tracking batch min/max, gamma = 0.999).
3. Fold: every QConvBn2d becomes a plain QConv2d with the folded weight and bias, the structure that
   ``quantize(model, recipe)`` builds for the ``fqn`` method, so the checkpoint reloads with
   :func:`qcnn.checkpoint.load_model` and compiles with :func:`qcnn.integer.to_integer`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qcnn.methods import calibrate, register_procedure, train_quantized
from qcnn.quant.fqn import attach_bn, fold_conv_bn
from qcnn.recipes import Recipe
from qcnn.transform import quantize


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

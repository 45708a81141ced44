"""Method policies and training procedures: how a recipe turns a float model into a trained quantized model.

Each family's :class:`~qcnn.methods.base.Method` (which quantizer goes where, its options, its training
hooks) lives in ``qcnn/methods/<family>.py`` beside its procedure; :func:`quantize` places them
(:mod:`qcnn.methods.place`).

A procedure is a function ``(model, bundle, recipe, out_dir, resume) -> (qmodel, metrics)`` registered
under a name with :func:`register_procedure`; ``recipe.procedure`` selects it (``None`` = plain
quantization-aware training, :func:`qat`). Procedures that are more than "quantize then train" live in
their own modules (two-step / progressive / guided, WAGE, Bi-Real two-step, Clip-Q, ELQ, VNQ).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from qcnn.calib import batch_input, batchnorm_in_train_mode, calibrating, reestimate_bn
from qcnn.methods.base import available_methods, get_method, register_method
from qcnn.methods.equalize import scale_residual_stream
from qcnn.methods.place import quantize
from qcnn.recipes import Recipe
from qcnn.train import fit

PROCEDURE_MODULES = (
    "qcnn.methods.zhuang",
    "qcnn.methods.wage",
    "qcnn.methods.bireal",
    "qcnn.methods.elq",
    "qcnn.methods.clipq",
    "qcnn.methods.vnq",
    "qcnn.methods.fqn",
)

Procedure = Callable[..., tuple[nn.Module, dict]]
PROCEDURES: dict[str, Procedure] = {}


def procedure_params(recipe: Recipe, valid: set[str], name: str) -> dict:
    """``recipe.procedure_params`` as a dict; keys the procedure ``name`` does not know are refused by name."""
    p = dict(recipe.procedure_params or {})
    bad = sorted(set(p) - valid)
    if bad:
        raise ValueError(f"unknown procedure_params {bad} for procedure {name!r}; valid: {sorted(valid)}")
    return p


def register_procedure(name: str):
    def deco(fn: Procedure) -> Procedure:
        PROCEDURES[name] = fn
        return fn

    return deco


_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in PROCEDURE_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    _loaded = True


def get_procedure(name: str | None) -> Procedure:
    if name is None:
        return qat
    _load_all()
    if name not in PROCEDURES:
        raise ValueError(f"unknown training procedure {name!r}; choose one of {sorted(PROCEDURES)}")
    return PROCEDURES[name]


def calibrate(qmodel: nn.Module, loader, max_images: int | None = None, bn_train: bool = False) -> nn.Module:
    """Run calibration data through ``qmodel`` in calibration mode (no gradients); returns ``qmodel``.

    ``loader``: any iterable of batches (a ``torch.utils.data.DataLoader`` of ``(x, y)`` pairs, a list of
    tensors, dicts with an ``"image"`` / ``"input"`` key), moved to the model's device; or a callable
    ``forward_loop(model)`` that runs the model on the user's data itself (``max_images`` does not apply).
    ``bn_train=False`` (post-training quantization): the whole model in eval mode, BatchNorm with its float
    running statistics. ``bn_train=True`` (before quantization-aware training): BatchNorm normalises with
    each batch's statistics, so the ranges observed are those of the quantized network that will be
    trained (see :mod:`qcnn.calib.batchnorm`); everything else stays in eval mode.
    """
    was_training = qmodel.training
    qmodel.eval()
    device = next((p.device for p in qmodel.parameters()), None)
    seen = 0
    with torch.no_grad(), batchnorm_in_train_mode(qmodel) if bn_train else nullcontext(), calibrating(qmodel):
        if callable(loader) and not hasattr(loader, "__iter__"):
            loader(qmodel)
            seen = None
        else:
            for batch in loader:
                x = batch_input(batch, device)
                qmodel(x)
                seen += x.shape[0]
                if max_images is not None and seen >= max_images:
                    break
    if seen == 0:
        raise ValueError("the calibration set is empty: no batch was seen")
    return qmodel.train(was_training)


def calibrate_for_training(qmodel: nn.Module, loader, images: int) -> nn.Module:
    """Calibration before QAT: ranges observed with train-mode BatchNorm, then every BatchNorm's running
    statistics re-estimated with the quantized weights and quantizers (:func:`~qcnn.calib.reestimate_bn`),
    so that the first evaluation already sees the quantized network's own statistics."""
    calibrate(qmodel, loader, images, bn_train=True)
    reestimate_bn(qmodel, loader, images)
    return qmodel


def quantize_and_calibrate(model: nn.Module, recipe: Recipe, bundle) -> nn.Module:
    """``quantize`` then calibrate on the bundle's held-out calibration split: for training
    (:func:`calibrate_for_training`) when ``recipe.train.epochs > 0``, else as post-training quantization
    (eval mode, float BatchNorm statistics)."""
    device = next(model.parameters()).device
    qmodel = quantize(model, recipe).to(device)
    if recipe.train.epochs > 0:
        return calibrate_for_training(qmodel, bundle.calib, recipe.calib_images)
    return calibrate(qmodel, bundle.calib, recipe.calib_images)


def train_quantized(qmodel: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
                    resume: bool = False, **fit_kwargs) -> dict:
    """Train an already quantized model with the method's parameter groups and step hook."""
    method = get_method(recipe.method, recipe.params)
    groups = (lambda m: method.param_groups(m, recipe.train.weight_decay))
    if method.param_groups(qmodel, recipe.train.weight_decay) is None:
        groups = None
    fit_kwargs.setdefault("param_groups", groups)
    fit_kwargs.setdefault("step_hook", method.step_hook)
    return fit(qmodel, bundle, recipe.train, out_dir, resume=resume, **fit_kwargs)


def qat(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
        resume: bool = False) -> tuple[nn.Module, dict]:
    """Plain quantization-aware training: quantize, calibrate, train ``recipe.train.epochs`` epochs.

    With ``epochs == 0`` this is post-training quantization: quantize and calibrate only.
    """
    qmodel = quantize_and_calibrate(model, recipe, bundle)
    if recipe.train.epochs == 0:
        return qmodel.eval(), {}
    metrics = train_quantized(qmodel, bundle, recipe, out_dir, resume)
    return qmodel, metrics


def run_recipe(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
               resume: bool = False) -> tuple[nn.Module, dict]:
    """Apply ``recipe`` to the float ``model`` with its training procedure; returns (qmodel, metrics).

    A method option ``stream_scale: c`` (DoReFa's) first scales a copy of the float network's residual stream by
    ``c`` (:func:`qcnn.methods.equalize.scale_residual_stream`, the same function), once for every stage; a network
    without one (no BatchNorm feeding a residual add, e.g. LeNet-5 or VGG) or one fx cannot trace is left as it is."""
    scale = getattr(get_method(recipe.method, recipe.params).options, "stream_scale", None)
    if scale is not None:
        model = copy.deepcopy(model)
        scale_residual_stream(model, scale, strict=False)
    return get_procedure(recipe.procedure)(model, bundle, recipe, out_dir, resume)


__all__ = ["PROCEDURES", "available_methods", "calibrate", "calibrate_for_training", "get_procedure",
           "procedure_params", "qat", "quantize_and_calibrate", "quantize", "register_method", "register_procedure",
           "run_recipe", "train_quantized"]

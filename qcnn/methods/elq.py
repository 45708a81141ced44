"""ELQ incremental quantization procedure (Zhou et al., CVPR 2018; quantizer in :mod:`qcnn.quant.elq`).

1. ``quantize(model, recipe)`` (method ``elq``): binary/ternary weight quantizers, activations float.
2. :func:`elq_start`: every ELQ layer fixes its closed-form ``alpha``/``delta`` from the float weights, and
   the gradient running mean is seeded from ``grad_batches`` batches of the calibration split; before
   training, every BatchNorm's running statistics are re-estimated with the quantized weights
   (:func:`~qcnn.calib.reestimate_bn`, ``recipe.calib_images`` images of the calibration split).
3. Training with ``recipe.train`` for ``recipe.train.epochs`` epochs, split into ``len(schedule)`` stages of
   equal length (in optimizer steps). At the start of stage ``i`` every layer freezes its least important
   free weights until ``schedule[i]`` of it is frozen (default 50%, 75%, 87.5%, 100%); the last stage, with
   everything frozen, retrains the remaining float parameters (BN, biases). The loss is
   ``cross-entropy + penalty * sum ||W - W_q||^2`` over free weights. After every step the gradient mean is
   updated and frozen weights are restored (they never move).

``metrics["stages"]`` lists, per stage, the step it started at, the scheduled fraction and the measured
frozen fraction over all ELQ weights. ``procedure_params``: ``grad_batches`` (default 4).
With ``epochs: 0`` all weights are quantized at once (ELQ's closed form as post-training quantization).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qcnn.calib.batchnorm import reestimate_bn
from qcnn.methods import register_procedure
from qcnn.methods.wage import _check_params
from qcnn.quant.elq import elq_layers, elq_penalty
from qcnn.quant.registry import get_method
from qcnn.recipes import Recipe
from qcnn.transform import quantize

_PARAMS = {"grad_batches"}


def elq_start(qmodel: nn.Module, loader=None, grad_batches: int = 4) -> None:
    """Initialise every ELQ layer (alpha, delta, masks) and seed the gradient mean from ``loader``."""
    layers = elq_layers(qmodel)
    if not layers:
        raise ValueError("the model has no ELQ-quantized layer (recipe method must be 'elq' with w_bits 1 or 2)")
    for _, m in layers:
        m.weight_quant.init_scale(m.weight)
    if loader is None or grad_batches <= 0:
        return
    was = qmodel.training
    qmodel.train()
    qmodel.zero_grad(set_to_none=True)
    n = 0
    for x, y in loader:
        F.cross_entropy(qmodel(x), y).backward()
        n += 1
        if n >= grad_batches:
            break
    with torch.no_grad():
        for _, m in layers:
            if m.weight.grad is not None:
                m.weight_quant.grad_avg.copy_(m.weight.grad / max(n, 1))
    qmodel.zero_grad(set_to_none=True)
    qmodel.train(was)


def freeze_all(qmodel: nn.Module, fraction: float) -> float:
    """Freeze ``fraction`` of every ELQ layer; returns the frozen fraction over all ELQ weights."""
    for _, m in elq_layers(qmodel):
        m.weight_quant.freeze_fraction(m.weight, fraction)
    return frozen_fraction(qmodel)


def frozen_fraction(qmodel: nn.Module) -> float:
    layers = elq_layers(qmodel)
    total = sum(m.weight.numel() for _, m in layers)
    frozen = sum(int(m.weight_quant.frozen.sum()) for _, m in layers)
    return frozen / max(total, 1)


def stage_starts(total_steps: int, stages: int) -> list[int]:
    """Optimizer step at which each stage starts (stage 0 at step 0)."""
    return [round(i * total_steps / stages) for i in range(stages)]


@register_procedure("elq")
def elq(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
        resume: bool = False) -> tuple[nn.Module, dict]:
    """ELQ incremental quantization (module docstring); returns (quantized model, metrics)."""
    from qcnn.train import evaluate, fit

    if recipe.method != "elq":
        raise ValueError(f"procedure 'elq' needs method 'elq', the recipe has method={recipe.method!r}")
    params = dict(recipe.procedure_params)
    _check_params(params, _PARAMS, "elq")
    method = get_method(recipe.method, recipe.params)
    schedule, lam = method.options.schedule, method.options.penalty
    device = next(model.parameters()).device
    qmodel = quantize(model, recipe).to(device)
    elq_start(qmodel, bundle.calib, int(params.get("grad_batches", 4)))

    total = recipe.train.epochs * len(bundle.train)
    if total > 0 and bundle.calib is not None:  # BN statistics of the binary/ternary network, not the float one
        reestimate_bn(qmodel, bundle.calib, recipe.calib_images)
    if total == 0:
        stages = [{"step": 0, "fraction": 1.0, "frozen": freeze_all(qmodel, 1.0)}]
        res = evaluate(qmodel, bundle.test)
        return qmodel.eval(), {"top1": res["top1"], "loss": res["loss"], "stages": stages}

    starts = stage_starts(total, len(schedule))
    stages = [{"step": 0, "fraction": schedule[0], "frozen": freeze_all(qmodel, schedule[0])}]

    def step_hook(m: nn.Module, step: int) -> None:
        method.step_hook(m, step)
        for s, f in zip(starts[1:], schedule[1:]):
            if step == s:
                stages.append({"step": step, "fraction": f, "frozen": freeze_all(m, f)})

    def loss_fn(m: nn.Module, x, y):
        logits = m(x)
        loss = F.cross_entropy(logits.float(), y)
        if lam > 0:
            loss = loss + lam * elq_penalty(m)
        return loss, logits

    metrics = fit(qmodel, bundle, recipe.train, out_dir, loss_fn=loss_fn, step_hook=step_hook, resume=resume)
    if frozen_fraction(qmodel) < 1.0:  # e.g. a resumed run past the last boundary
        stages.append({"step": total, "fraction": 1.0, "frozen": freeze_all(qmodel, 1.0)})
        res = evaluate(qmodel, bundle.test)
        metrics.update(top1=res["top1"], loss=res["loss"])
    metrics["stages"] = stages
    return qmodel, metrics


__all__ = ["elq", "elq_start", "freeze_all", "frozen_fraction", "stage_starts"]

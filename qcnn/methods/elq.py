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

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcnn.calib.batchnorm import reestimate_bn
from qcnn.methods import procedure_params, register_procedure
from qcnn.methods.base import LayerContext, Method, get_method, register_method
from qcnn.methods.place import quantize
from qcnn.quant.base import Quantizer
from qcnn.quant.elq import CRITERIA, ELQWeightQuantizer
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe
from qcnn.train import evaluate, fit


def elq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers carrying an :class:`ELQWeightQuantizer`."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight_quant", None), ELQWeightQuantizer)]


def elq_penalty(model: nn.Module) -> Tensor:
    """``sum_layers ||W - alpha T(W)||^2`` over the free (not frozen) weights; no gradient through ``W_q``."""
    total = None
    for _, m in elq_layers(model):
        q = m.weight_quant
        d = (m.weight - q.quantized(m.weight).detach()).masked_fill(q.frozen, 0.0)
        s = d.pow(2).sum()
        total = s if total is None else total + s
    if total is None:
        p = next(model.parameters())
        return torch.zeros((), device=p.device, dtype=p.dtype)
    return total


@dataclass
class ELQOptions:
    #: importance used to choose which weights to freeze: ``loss`` (|g (W - W_q)|) or ``error`` (|W - W_q|)
    criterion: str = "loss"
    #: frozen fraction of each layer at the start of each training stage (ends at 1.0)
    schedule: list[float] = field(default_factory=lambda: [0.5, 0.75, 0.875, 1.0])
    #: weight lambda of the ||W - W_q||^2 term
    penalty: float = 1e-4

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r} is not one of {CRITERIA}")
        s = [float(f) for f in self.schedule]
        if not s or any(not 0 < f <= 1 for f in s) or any(b < a for a, b in zip(s, s[1:])) or s[-1] != 1.0:
            raise ValueError(f"schedule={self.schedule!r} must be non-decreasing fractions in (0, 1] ending at 1.0")
        self.schedule = s
        if self.penalty < 0:
            raise ValueError(f"penalty={self.penalty!r} must be >= 0")


@register_method
class ELQMethod(Method):
    """ELQ: binary/ternary incremental weight quantization, activations float (procedure ``elq``).

    Layers with more than 2 weight bits (an ``8bit`` first/last policy) get plain 8-bit uniform weights."""

    supported = (nn.Conv1d, nn.Conv2d, nn.Linear)  # masks follow the stored (out, in, ...) layout
    name = "elq"
    Options = ELQOptions
    weight_bits = (1, 2)
    quantizes_activations = False

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        if ctx.w_bits <= 2:
            return ELQWeightQuantizer(ctx.w_bits, self.options.criterion)
        return UniformQuantizer(ctx.w_bits, signed=True, symmetric=True, per_channel=ctx.per_channel, dynamic=True)


    def step_hook(self, model: nn.Module, step: int) -> None:
        """Track the gradient mean and put frozen weights back (they never move)."""
        for _, m in elq_layers(model):
            if m.weight.grad is not None:
                m.weight_quant.update_grad(m.weight.grad)
            m.weight_quant.restore(m.weight)


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

    if recipe.method != "elq":
        raise ValueError(f"procedure 'elq' needs method 'elq', the recipe has method={recipe.method!r}")
    params = procedure_params(recipe, _PARAMS, "elq")
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

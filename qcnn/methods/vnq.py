"""VNQ procedure (Achterhold et al., ICLR 2018): ELBO training of variational layers, then prune + snap.

1. ``quantize(model, recipe)`` with method ``vnq`` gives every conv/linear layer a
   :class:`~qcnn.quant.vnq.VNQQuantizer` (``log sigma^2`` per weight, learned ternary ``r``); the layers are
   swapped for their local-reparameterisation versions (:func:`~qcnn.quant.vnq.to_variational`).
2. Training minimises the negative ELBO per image::

       loss = CE(model(x), y) + beta(t) * sum_layers KL / N

   with ``N`` the number of training images and ``beta`` rising linearly from 0 to ``kl_weight`` over the
   first ``warmup`` fraction of the optimizer steps (KL warm-up). ``log sigma^2`` and ``r`` get no weight
   decay (:meth:`~qcnn.methods.vnq.VNQMethod.param_groups`).
3. After training, without fine-tuning, :func:`~qcnn.quant.vnq.prune_and_snap` sets weights with
   ``log sigma^2 - log theta^2 > threshold`` to 0 and snaps the rest to the nearest of ``{-r, 0, r}``.
4. Optional (``bn_images`` > 0): the BatchNorm running statistics are recomputed with the snapped weights on
   the first ``bn_images`` images of the calibration split (:func:`reestimate_bn`). No parameter is trained;
   the statistics collected during ELBO training came from noisy, unsnapped weights.

``procedure_params`` (all optional): ``warmup`` (0.5), ``kl_weight`` (1.0), ``threshold`` (2.0),
``train_images`` (None = all), ``bn_images`` (0 = keep the training statistics). Metrics add ``top1`` (test,
after snapping and any BatchNorm re-estimation), ``top1_snap_no_bn`` (after snapping, before the re-estimation;
only with ``bn_images``), ``top1_before_snap`` (mean weights),
``pruned_fraction`` (zero weights over all VNQ layers: pruned by ``log alpha`` or nearest to 0),
``threshold_pruned_fraction`` (by ``log alpha`` alone), ``level_fractions`` (``-r``, ``0``, ``+r``) and
``vnq_layers`` (per layer ``r`` and the same fractions).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcnn.calib.batchnorm import reestimate_bn
from qcnn.io import write_text
from qcnn.methods import quantize_and_calibrate, register_procedure, train_quantized
from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.vnq import EPS, VNQQuantizer
from qcnn.recipes import Recipe, checked_fields
from qcnn.train import evaluate
from qcnn.transform import to_variational, variational_layers


@dataclass
class VNQOptions:
    #: initial log sigma^2 of every weight
    log_sigma2_init: float = -8.0
    #: learn the codebook value r (else fixed at its ternary initialisation)
    learn_r: bool = True
    #: learning rate of log sigma^2 and r (None = the recipe's)
    sigma_lr: float | None = None
    #: clip every mean weight theta to [-r, r] after each optimizer step (see the module docstring)
    clip_theta: bool = False


class VNQMethod(Method):
    """VNQ: variational weights with a ternary multi-spike prior; activations float (weights-only method)."""

    supported = (nn.Conv2d, nn.Linear)  # variational layers exist for these only
    name = "vnq"
    Options = VNQOptions
    weight_bits = (2,)
    quantizes_activations = False

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return VNQQuantizer(ctx.module.weight, self.options.log_sigma2_init, self.options.learn_r)


    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict] | None:
        """``log sigma^2`` and ``r`` without weight decay (the KL is their only regulariser), at ``sigma_lr``."""
        var = [p for n, p in model.named_parameters() if n.endswith("weight_quant.log_sigma2")
               or n.endswith("weight_quant.r")]
        ids = {id(p) for p in var}
        rest = [p for p in model.parameters() if id(p) not in ids]
        decay = [p for p in rest if p.dim() >= 2]
        no_decay = [p for p in rest if p.dim() < 2]
        group = {"params": var, "weight_decay": 0.0}
        if self.options.sigma_lr is not None:
            group["lr"] = self.options.sigma_lr
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}, group]

    @torch.no_grad()
    def step_hook(self, model: nn.Module, step: int) -> None:
        """With ``clip_theta``: ``theta <- clamp(theta, -r, r)`` in every VNQ layer after each step."""
        if not self.options.clip_theta:
            return
        for _, m in variational_layers(model):
            r = m.weight_quant.r.detach().abs()
            m.weight.clamp_(-r, r)


register_method(VNQMethod)


def kl_total(model: nn.Module) -> Tensor:
    """Sum of the KL terms of all variational layers."""
    terms = [m.weight_quant.kl(m.weight) for _, m in variational_layers(model)]
    if not terms:
        raise ValueError("the model has no VNQ layer: quantize it with method 'vnq' first")
    return torch.stack(terms).sum()


@torch.no_grad()
def prune_and_snap(model: nn.Module, threshold: float = 2.0) -> dict:
    """Replace every variational layer's weights by their pruned ternary values (no fine-tuning).

    Returns per-layer statistics: ``{name: {"r", "zero_fraction", "neg_fraction", "pos_fraction",
    "pruned_fraction", "numel"}}``: the fractions of weights at ``0``, ``-r`` and ``+r``, and the fraction
    set to 0 by the ``log alpha`` threshold (the other zeros are weights nearest to 0).
    """
    stats = {}
    for name, m in variational_layers(model):
        wq = m.weight_quant
        la0 = wq.log_sigma2 - torch.log(m.weight * m.weight + EPS)
        q = wq.snap(m.weight, threshold)
        m.weight.copy_(q)
        stats[name] = {"r": float(wq.r.detach().abs()), "zero_fraction": float((q == 0).float().mean()),
                       "neg_fraction": float((q < 0).float().mean()), "pos_fraction": float((q > 0).float().mean()),
                       "pruned_fraction": float((la0 > threshold).float().mean()), "numel": q.numel()}
    return stats



@dataclass
class VNQProcedureOptions:
    warmup: float = 0.5
    kl_weight: float = 1.0
    threshold: float = 2.0
    train_images: int | None = None
    bn_images: int = 0

    def __post_init__(self):
        if not 0.0 <= self.warmup <= 1.0:
            raise ValueError(f"warmup={self.warmup!r} must be a fraction in [0, 1]")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight={self.kl_weight!r} must be >= 0")
        if isinstance(self.bn_images, bool) or not isinstance(self.bn_images, int) or self.bn_images < 0:
            raise ValueError(f"bn_images={self.bn_images!r} must be a non-negative integer")

    @classmethod
    def from_dict(cls, d: dict | None) -> VNQProcedureOptions:
        return cls(**checked_fields(cls, d, "procedure_params of vnq", unknown="unknown procedure_params"))


class ELBOLoss:
    """``loss_fn(model, x, y) -> (loss, logits)`` for :func:`qcnn.train.fit`: CE + beta(step) KL / N.

    ``beta`` is the warm-up factor of the current call: ``kl_weight * min(1, calls / warmup_steps)``.
    """

    def __init__(self, n_train: int, warmup_steps: int, kl_weight: float = 1.0):
        if n_train < 1:
            raise ValueError(f"n_train={n_train!r} must be positive")
        self.n_train = n_train
        self.warmup_steps = max(0, int(warmup_steps))
        self.kl_weight = kl_weight
        self.calls = 0
        self.last = {}

    def beta(self) -> float:
        if self.warmup_steps == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, self.calls / self.warmup_steps)

    def __call__(self, model: nn.Module, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        if not model.training:
            return ce, logits
        beta = self.beta()
        self.calls += 1
        kl = kl_total(model) / self.n_train
        self.last = {"ce": ce.detach(), "kl": kl.detach(), "beta": beta}
        return ce + beta * kl, logits


def n_images(loader) -> int:
    for attr in ("num_images", "num_samples", "n"):
        v = getattr(loader, attr, None)
        if isinstance(v, int):
            return v
    for attr in ("x", "images", "indices"):
        v = getattr(loader, attr, None)
        if v is not None and hasattr(v, "__len__"):
            return len(v)
    return len(loader) * getattr(loader, "batch_size", 1)


@torch.no_grad()
@register_procedure("vnq")
def vnq(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
        resume: bool = False) -> tuple[nn.Module, dict]:
    """VNQ: ELBO training with the ternary multi-spike prior, then pruning and snapping (no fine-tuning)."""

    opts = VNQProcedureOptions.from_dict(recipe.procedure_params)
    qmodel = to_variational(quantize_and_calibrate(model, recipe, bundle))
    metrics: dict = {}
    if recipe.train.epochs > 0:
        ft = bundle
        if opts.train_images is not None:
            ft = dataclasses.replace(bundle, train=bundle.train.take(opts.train_images))
        steps = len(ft.train) * recipe.train.epochs
        loss = ELBOLoss(n_images(ft.train), int(opts.warmup * steps), opts.kl_weight)
        metrics.update(train_quantized(qmodel, ft, recipe, out_dir, resume, loss_fn=loss) or {})
        metrics["top1_before_snap"] = metrics.get("top1")
    stats = prune_and_snap(qmodel, opts.threshold)
    qmodel.eval()
    if opts.bn_images > 0:
        metrics["top1_snap_no_bn"] = evaluate(qmodel, bundle.test)["top1"]
        source = bundle.calib if bundle.calib is not None else bundle.train
        metrics["bn_images"] = reestimate_bn(qmodel, source, opts.bn_images)
        qmodel.eval()
    res = evaluate(qmodel, bundle.test)
    n = sum(s["numel"] for s in stats.values())
    def overall(key):
        return sum(s[key] * s["numel"] for s in stats.values()) / max(n, 1)

    metrics.update(top1=res["top1"], loss=res["loss"], vnq_layers=stats, pruned_fraction=overall("zero_fraction"),
                   threshold_pruned_fraction=overall("pruned_fraction"),
                   level_fractions={"-r": overall("neg_fraction"), "0": overall("zero_fraction"),
                                    "+r": overall("pos_fraction")})
    if out_dir is not None:
        path = Path(out_dir) / "vnq_layers.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = ("top1_before_snap", "top1_snap_no_bn", "top1", "pruned_fraction", "threshold_pruned_fraction",
                "level_fractions", "bn_images")
        write_text(path, json.dumps({"layers": stats, **{k: metrics.get(k) for k in keys}}, indent=1))
    return qmodel, metrics


__all__ = ["ELBOLoss", "VNQProcedureOptions", "reestimate_bn", "vnq"]

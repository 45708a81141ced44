"""VNQ procedure (Achterhold et al., ICLR 2018): ELBO training of variational layers, then prune + snap.

1. ``quantize(model, recipe)`` with method ``vnq`` gives every conv/linear layer a
   :class:`~qcnn.quant.vnq.VNQQuantizer` (``log sigma^2`` per weight, learned ternary ``r``); the layers are
   swapped for their local-reparameterisation versions (:func:`~qcnn.quant.vnq.to_variational`).
2. Training minimises the negative ELBO per image::

       loss = CE(model(x), y) + beta(t) * sum_layers KL / N

   with ``N`` the number of training images and ``beta`` rising linearly from 0 to ``kl_weight`` over the
   first ``warmup`` fraction of the optimizer steps (KL warm-up). ``log sigma^2`` and ``r`` get no weight
   decay (:meth:`~qcnn.quant.vnq.VNQMethod.param_groups`).
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
from torch import nn

from qcnn.calib.batchnorm import reestimate_bn
from qcnn.io import write_text
from qcnn.methods import quantize_and_calibrate, register_procedure, train_quantized
from qcnn.quant.vnq import kl_total, prune_and_snap, to_variational
from qcnn.recipes import Recipe


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
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown procedure_params {bad} for vnq; valid keys: {sorted(names)}")
        return cls(**d)


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
    from qcnn.train import evaluate

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

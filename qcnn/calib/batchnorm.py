"""BatchNorm statistics of a quantized network: the network's own, not the float model's.

A float checkpoint's BatchNorm running statistics describe the float weights. Once the weights are on a
low-bit grid each output channel's scale changes (2-bit DoReFa weights: 1.3-3.5x per channel, far more for
near-dead channels), so an eval-mode BN normalises with the wrong mean and variance and the error compounds
down a residual stream. Two tools keep quantization-aware training on the quantized network's statistics:

* :func:`batchnorm_in_train_mode`: a context in which every BatchNorm normalises with the statistics of
  the batch it sees (the rest of the model stays in eval mode: no dropout, no range tracking). Calibration
  for QAT runs inside it, so the observed activation ranges are those of the network that will be trained.
* :func:`reestimate_bn`: recompute every BatchNorm's running mean and variance as the equal-weight average
  (``momentum=None``) over the first ``images`` images, with the model's current (quantized) weights and
  quantizers active; no parameter changes. Run after calibration, before the first evaluation.

Post-training quantization keeps the float BatchNorm (it is folded into the weights), so it calibrates in
plain eval mode.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm module of ``model`` that tracks running statistics."""
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


@contextmanager
def batchnorm_in_train_mode(model: nn.Module):
    """Model in eval mode except its BatchNorm layers (batch statistics); train/eval modes restored on exit.

    The BN running statistics are restored on exit too, so the context only changes what the forward
    computes, never the model's state.
    """
    was_training = {m: m.training for m in model.modules()}
    bns = batchnorms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    model.eval()
    for m in bns:
        m.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, (mean, var, n) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)
        for m, t in was_training.items():
            m.training = t


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader, images: int) -> int:
    """Recompute every BatchNorm's running mean and variance from the first ``images`` images of ``loader``.

    Forward passes in eval mode (quantizers quantize, ranges stay fixed) with only the BatchNorm layers
    collecting statistics, as an equal-weight average (``momentum=None``). No parameter changes.
    Returns the number of images used (0 when the model has no BatchNorm or ``images <= 0``).
    """
    bns = batchnorms(model)
    if not bns or images <= 0:
        return 0
    was_training = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    seen = 0
    try:
        for x, _ in loader:
            model(x[: images - seen].to(device))
            seen += min(len(x), images - seen)
            if seen >= images:
                break
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, t in was_training.items():
            m.training = t
    if seen == 0:
        raise ValueError("reestimate_bn: the loader gave no images")
    return seen


__all__ = ["batchnorm_in_train_mode", "batchnorms", "reestimate_bn"]

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


def batch_input(batch, device=None):
    """The model input of a calibration batch: a tensor, the first item of an (x, y, ...) tuple / list, or a
    dict's ``"image"`` / ``"input"`` / ``"x"`` entry; moved to the model's device."""
    if isinstance(batch, dict):
        key = next((k for k in ("image", "images", "input", "x") if k in batch), None)
        if key is None:
            raise ValueError(f"calibration batch is a dict without an 'image', 'input' or 'x' key: {sorted(batch)}")
        batch = batch[key]
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("calibration batch is an empty tuple / list")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration batch holds a {type(batch).__name__}, not a tensor (give batches of "
                        "tensors, (x, y) pairs, or a forward_loop(model) callable)")
    return batch.to(device) if device is not None else batch


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader, images: int) -> int:
    """Recompute every BatchNorm's running mean and variance from the first ``images`` images of ``loader``.

    ``loader`` is what :func:`qcnn.methods.calibrate` takes: an iterable of batches (``(x, y)`` pairs, tensors,
    dicts with an ``"image"`` / ``"input"`` key) or a callable ``forward_loop(model)`` (``images`` does not
    limit it then).

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
        if callable(loader) and not hasattr(loader, "__iter__"):
            counted = []
            hook = model.register_forward_pre_hook(lambda _m, args: counted.append(len(args[0]) if args else 0))
            try:
                loader(model)
            finally:
                hook.remove()
            seen = sum(counted)
        else:
            for batch in loader:
                x = batch_input(batch, device)
                model(x[: images - seen])
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


__all__ = ["batch_input", "batchnorm_in_train_mode", "batchnorms", "reestimate_bn"]

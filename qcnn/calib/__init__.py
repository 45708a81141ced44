"""Range estimators and the explicit calibration mode."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from qcnn.calib.batchnorm import batch_input, batchnorm_in_train_mode, batchnorms, reestimate_bn
from qcnn.calib.observers import OBSERVERS, EMAObserver, MinMaxObserver, Observer, make_observer
from qcnn.quant.base import Quantizer

__all__ = ["OBSERVERS", "EMAObserver", "MinMaxObserver", "Observer", "batch_input", "batchnorm_in_train_mode",
           "batchnorms", "calibrating", "make_observer", "reestimate_bn"]


@contextmanager
def calibrating(model: nn.Module):
    """Calibration mode: every quantizer of ``model`` observes its input and passes it through unchanged;
    on exit each computes its parameters (scale, zero point, fl ...). A model whose parameters or BatchNorm
    statistics hold NaN / Inf is refused on entry, with those tensors named.

    >>> with calibrating(qmodel):
    ...     for x, _ in calib_batches:
    ...         qmodel(x)
    """

    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and (n.endswith("running_mean") or n.endswith("running_var") or
                                         isinstance(t, torch.nn.Parameter)) and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"the model holds NaN or Inf in {', '.join(bad[:5])}{more}: the model itself is broken "
                         "(a diverged training run?), not the calibration data")
    quants = [m for m in model.modules() if isinstance(m, Quantizer)]
    for q in quants:
        q.observing = True
    try:
        yield model
    finally:
        for q in quants:
            q.observing = False
    for q in quants:
        q.finish_calibration()

import qcnn.calib.histogram  # noqa: E402,F401  (registers percentile, mse, kl, kl_nozero)

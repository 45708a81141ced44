"""Changing a quantizer's grid: the QCode fractional-length window search and new bit widths.

Shared by the accuracy-aware bit search and greedy fl search (:mod:`qcnn.methods.ptq`) and the
mixed-precision search (:mod:`qcnn.methods.mixed_precision`).

* :func:`best_weight_fl` / :func:`best_act_fl`: the fl in ``fl0 - w .. fl0 + w`` around the initial
  ``fl0 = B - 1 - ceil(log2 max|x|)`` that minimises the MSE (or the KL divergence) between a tensor (or
  the recorded ``|x|`` histogram of an activation) and its fixed-point version.
* :func:`set_bits`: a quantizer at a new width with its grid re-chosen for it (fl by the window search
  for QCode weights, from the observer otherwise; a uniform range from the weight or the observer);
  :func:`snapshot` / :func:`restore` undo it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.calib.histogram import HistogramObserver
from qcnn.quant.base import Quantizer, check_bits, qrange
from qcnn.quant.fixed_point import FixedPointQuantizer, fixed_point_quant
from qcnn.quant.uniform import UniformQuantizer

METRICS = ("mse", "kl")


@torch.no_grad()
def best_weight_fl(q: FixedPointQuantizer, w: Tensor, metric: str = "mse", window: int = 3) -> Tensor:
    """fl in ``fl0 +- window`` minimising the weight's quantization error (per channel if ``q`` is)."""
    w = w.detach().float()
    lo, hi = (w.amin(), w.amax()) if q.axis is None else _channel_minmax(w, q.axis)
    fl0 = q.fl_from_range(lo, hi)
    deltas = torch.arange(-window, window + 1, dtype=torch.int32)
    if metric == "kl" and q.axis is None:
        h = HistogramObserver()
        h.update(w)
        scores = h.fl_scores(q.bits, q.signed, (fl0.cpu() + deltas).tolist(), "kl")
        return fl0 + deltas[int(torch.argmin(scores))].to(fl0.device)
    if metric not in METRICS:
        raise ValueError(f"unknown fl search metric {metric!r}; choose one of {METRICS}")
    errs = []
    for d in deltas.tolist():
        fl = fl0 + d
        err = (fixed_point_quant(w, fl, q.qmin, q.qmax, q.axis) - w) ** 2
        errs.append(err.sum() if q.axis is None else err.transpose(0, q.axis).reshape(err.shape[q.axis], -1).sum(1))
    errs = torch.stack(errs)  # (deltas, [channels])
    return fl0 + deltas.to(fl0.device)[torch.argmin(errs, dim=0)]


def _channel_minmax(w: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    flat = w.transpose(0, axis).reshape(w.shape[axis], -1)
    return flat.amin(1), flat.amax(1)


@torch.no_grad()
def best_act_fl(q: FixedPointQuantizer, hist: HistogramObserver, metric: str = "mse", window: int = 3) -> Tensor:
    """fl in ``fl0 +- window`` minimising the MSE / KL of the recorded activation histogram."""
    if metric not in METRICS:
        raise ValueError(f"unknown fl search metric {metric!r}; choose one of {METRICS}")
    amax = torch.maximum(hist.min_val.abs(), hist.max_val.abs()) if q.signed else hist.max_val.clamp(min=0)
    fl0 = q.fl_from_range(-amax, amax)
    cands = fl0.cpu() + torch.arange(-window, window + 1, dtype=torch.int32)
    scores = hist.fl_scores(q.bits, q.signed, cands.tolist(), metric)
    return cands[int(torch.argmin(scores))]


def set_bits(q: Quantizer, bits: int, weight: Tensor | None = None, hist: HistogramObserver | None = None,
             metric: str = "mse", window: int = 3) -> None:
    """Change a quantizer's bit width and re-choose its fl / range for the new grid."""
    if isinstance(q, FixedPointQuantizer):
        q.set_bits(bits)
        if weight is not None:
            q.set_fl(best_weight_fl(q, weight, metric, window))
        elif hist is not None:
            q.set_fl(best_act_fl(q, hist, metric, window))
        else:
            q.finish_calibration()
    elif isinstance(q, UniformQuantizer):
        q.bits = check_bits(bits)
        q.qmin, q.qmax = qrange(bits, q.signed, q.narrow)
        if not q.dynamic:
            q.finish_calibration()
    else:
        raise ValueError(f"a bit-width search cannot change the bits of {type(q).__name__}")


def snapshot(q: Quantizer) -> dict:
    """The bits and state of ``q`` (for :func:`restore`)."""
    return {"bits": q.bits, "state": {k: v.clone() for k, v in q.state_dict().items()}}


def restore(q: Quantizer, snap: dict) -> None:
    """``q`` back at a :func:`snapshot`."""
    if isinstance(q, FixedPointQuantizer):
        q.set_bits(snap["bits"])
    else:
        q.bits = snap["bits"]
        q.qmin, q.qmax = qrange(q.bits, q.signed, q.narrow)
    q.load_state_dict(snap["state"])



__all__ = ["METRICS", "best_act_fl", "best_weight_fl", "restore", "set_bits", "snapshot"]

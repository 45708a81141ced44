"""Post-training quantization: calibrate, configure QCodes, search bit widths (no training).

Three levels of effort, chosen by ``search``:

* ``none``: ``quantize(model, recipe)`` with BN folded, then one calibration pass over the held-out
  calibration split (``recipe.calib`` picks the range estimator).
* ``greedy`` (QCode only; the survey's configuration (a), after Ristretto): every layer's weight and
  activation fractional length is chosen independently in a window ``fl0 - w .. fl0 + w`` (``w = 3``)
  around the initial ``fl0 = B - 1 - ceil(log2 max|x|)`` to minimise the quantization error between the
  float tensor and its quantized version: mean squared error (``metric="mse"``) or the TensorRT KL
  divergence at the grid's threshold (``metric="kl"``). Weights are scored on the weight tensor itself
  (per-channel fl: each channel on its own, MSE), activations on the streaming ``|x|`` histograms recorded
  from the float (BN-folded) network during the calibration pass.
* ``accuracy`` (configuration (b), Ristretto-style sweep with an NNCF-style ``max_drop``): starting from
  the greedy (QCode) or calibrated (uniform) configuration at the recipe's bits, a greedy descent lowers
  each layer's weight bits (largest layers first) and then each layer's activation bits (layers with the
  most MACs first) through ``bit_candidates`` (8, 6, 5, 4), re-choosing the fl of a changed QCode (or the
  range of a uniform grid) for the new width, and keeps a step only while top-1 on the held-out
  calibration split stays within ``max_drop`` points of the float model on that split; the first step
  that breaks the budget ends the descent of that layer. The result is the cheapest configuration found
  (fewest weight bits, then BOPs), returned as a Recipe with one override per layer; the fl values and
  ranges live in the model's state_dict. The test set is never used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qcnn.calib import calibrating
from qcnn.calib.histogram import HistogramObserver
from qcnn.calib.observers import check_finite
from qcnn.methods.base import get_method
from qcnn.methods.place import quantize
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Quantizer, check_bits, qrange
from qcnn.quant.fixed_point import FixedPointQuantizer, fixed_point_quant
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Override, Recipe
from qcnn.report.size import count_macs
from qcnn.train import evaluate

SEARCHES = ("none", "greedy", "accuracy")
METRICS = ("mse", "kl")


@dataclass
class PTQResult:
    """What :func:`post_training_quantize` returns."""

    model: nn.Module  #: the calibrated quantized model (eval mode)
    recipe: Recipe  #: the recipe that rebuilds it (with per-layer overrides after an accuracy search)
    float_calib_top1: float | None = None  #: float top-1 on the held-out calibration split (accuracy search)
    calib_top1: float | None = None  #: quantized top-1 on that split
    steps: list[dict] = field(default_factory=list)  #: accuracy-search log (layer, kind, bits, top1, kept)


def _batches(loader, max_images: int | None) -> list[tuple[Tensor, Tensor]]:
    out, seen = [], 0
    for x, y in loader:
        if max_images is not None and seen >= max_images:
            break
        if max_images is not None and seen + x.shape[0] > max_images:
            x, y = x[: max_images - seen], y[: max_images - seen]
        out.append((x, y))
        seen += x.shape[0]
    if not out:
        raise ValueError("the calibration set is empty: no batch was seen")
    return out


@torch.no_grad()
def calibrate_with_histograms(qmodel: nn.Module, batches, record: bool = True) -> dict[str, HistogramObserver]:
    """One calibration pass over ``batches``; with ``record``, also a ``|x|`` histogram of the input of every
    activation quantizer (the float network's activations, since quantizers pass through while observing).
    Returns ``{quantizer name: histogram}``."""
    hists: dict[str, HistogramObserver] = {}
    hooks = []
    if record:
        for name, q in _act_quantizers(qmodel):
            hists[name] = HistogramObserver()
            hooks.append(q.register_forward_pre_hook(lambda mod, args, h=hists[name]: h.update(args[0])))
    qmodel.eval()
    seen = 0
    try:
        with calibrating(qmodel):
            for x, _ in batches:
                check_finite(x)
                qmodel(x)
                seen += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise ValueError("the calibration set is empty: no batch was seen")
    return hists


def _act_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Activation quantizers (layer inputs and residual-add outputs), by module name."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)) and isinstance(m.input_quant, Quantizer):
            out.append((f"{name}.input_quant" if name else "input_quant", m.input_quant))
        elif hasattr(m, "out_quant") and not isinstance(m, (QConv2d, QLinear)) and isinstance(m.out_quant, Quantizer):
            out.append((f"{name}.out_quant", m.out_quant))
    return out


# -- fl window search ---------------------------------------------------------------------------------
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


def greedy_fl_search(qmodel: nn.Module, hists: dict[str, HistogramObserver], metric: str = "mse",
                     window: int = 3) -> dict[str, int | list[int]]:
    """Set every QCode's fl by the window search (see module docstring); returns ``{quantizer: fl}``."""
    chosen: dict[str, int | list[int]] = {}
    for name, m in qmodel.named_modules():
        if isinstance(m, (QConv2d, QLinear)) and isinstance(m.weight_quant, FixedPointQuantizer):
            fl = best_weight_fl(m.weight_quant, m.weight, metric, window)
            m.weight_quant.set_fl(fl)
            chosen[f"{name}.weight_quant"] = fl.tolist()
    for name, q in _act_quantizers(qmodel):
        if isinstance(q, FixedPointQuantizer) and name in hists:
            fl = best_act_fl(q, hists[name], metric, window)
            q.set_fl(fl)
            chosen[name] = int(fl)
    return chosen


# -- accuracy-aware bit-width search ------------------------------------------------------------------
@torch.no_grad()
def top1(model: nn.Module, batches) -> float:
    """Top-1 (percent) of ``model`` in eval mode on a list of ``(x, y)`` batches (:func:`qcnn.train.evaluate`)."""
    model.eval()
    return float(evaluate(model, batches)["top1"])


def _set_bits(q: Quantizer, bits: int, weight: Tensor | None, hist: HistogramObserver | None,
              metric: str, window: int) -> None:
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
        raise ValueError(f"the accuracy search cannot change the bits of {type(q).__name__}")


def _snapshot(q: Quantizer) -> dict:
    return {"bits": q.bits, "state": {k: v.clone() for k, v in q.state_dict().items()}}


def _restore(q: Quantizer, snap: dict) -> None:
    if isinstance(q, FixedPointQuantizer):
        q.set_bits(snap["bits"])
    else:
        q.bits = snap["bits"]
        q.qmin, q.qmax = qrange(q.bits, q.signed, q.narrow)
    q.load_state_dict(snap["state"])


def accuracy_search(qmodel: nn.Module, eval_batches, float_top1: float, hists: dict[str, HistogramObserver],
                    max_drop: float = 0.5, bit_candidates=(8, 6, 5, 4), metric: str = "mse", window: int = 3,
                    macs: dict[str, int] | None = None, log=None) -> list[dict]:
    """Greedy bit-width descent (see module docstring). Changes ``qmodel`` in place; returns the step log."""
    cands = sorted({check_bits(b, "bit candidate") for b in bit_candidates}, reverse=True)
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (QConv2d, QLinear))]
    floor = float_top1 - max_drop
    steps: list[dict] = []
    macs = macs or {}

    def descend(name: str, q: Quantizer, kind: str, weight, hist) -> None:
        for b in [c for c in cands if c < q.bits]:
            snap = _snapshot(q)
            _set_bits(q, b, weight, hist, metric, window)
            acc = top1(qmodel, eval_batches)
            kept = acc >= floor
            steps.append({"layer": name, "kind": kind, "bits": b, "top1": acc, "kept": kept})
            if log is not None:
                log(f"  {name} {kind} {b} bits: top1 {acc:.2f} ({'kept' if kept else 'reverted'})")
            if not kept:
                _restore(q, snap)
                return

    for name, m in sorted(layers, key=lambda nm: -nm[1].weight.numel()):
        if isinstance(m.weight_quant, Quantizer):
            descend(name, m.weight_quant, "w", m.weight, None)
    for name, m in sorted(layers, key=lambda nm: -macs.get(nm[0], 0)):
        if isinstance(m.input_quant, Quantizer):
            descend(name, m.input_quant, "a", None, hists.get(f"{name}.input_quant"))
    return steps


def recipe_of(qmodel: nn.Module, recipe: Recipe) -> Recipe:
    """``recipe`` plus one exact-name override per quantized layer giving its current bits."""
    overrides = [o for o in recipe.overrides if o.skip]
    for name, m in qmodel.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            wb = m.weight_quant.bits if isinstance(m.weight_quant, Quantizer) else None
            ab = m.input_quant.bits if isinstance(m.input_quant, Quantizer) else None
            overrides.append(Override(pattern=name, w_bits=wb, a_bits=ab))
    return dataclasses.replace(recipe, overrides=overrides)


def post_training_quantize(model: nn.Module, recipe: Recipe, calib_loader, search: str = "none",
                           metric: str = "mse", max_drop: float = 0.5, bit_candidates=(8, 6, 5, 4),
                           window: int = 3, eval_images: int = 2000, log=None) -> PTQResult:
    """Quantize the float ``model`` without training (see module docstring).

    ``calib_loader`` yields ``(x, y)`` batches of the held-out calibration split (never the test set): the
    first ``recipe.calib_images`` images calibrate, up to ``eval_images`` score the accuracy search.
    """
    if search not in SEARCHES:
        raise ValueError(f"unknown search {search!r}; choose one of {SEARCHES}")
    if metric not in METRICS:
        raise ValueError(f"unknown fl search metric {metric!r}; choose one of {METRICS}")
    fl_search = get_method(recipe.method, recipe.params).fl_search
    if search == "greedy" and not fl_search:
        raise ValueError(f"search 'greedy' chooses QCode fractional lengths: it needs method 'qcode' (a "
                         f"fixed-point method), got {recipe.method!r}")
    if recipe.calib_images <= 0:
        raise ValueError(f"calib_images={recipe.calib_images!r} must be positive")
    recipe = dataclasses.replace(recipe, fold_bn=True)
    model = model.eval()
    qmodel = quantize(model, recipe).eval()
    n_images = max(recipe.calib_images, eval_images if search == "accuracy" else 0)
    batches = _batches(calib_loader, n_images)
    calib_batches = _batches(batches, recipe.calib_images)
    want_hists = fl_search and search != "none"
    hists = calibrate_with_histograms(qmodel, calib_batches, record=want_hists)
    if search in ("greedy", "accuracy") and fl_search:
        greedy_fl_search(qmodel, hists, metric, window)
    result = PTQResult(qmodel, recipe)
    if search == "accuracy":
        eval_batches = _batches(batches, eval_images)
        result.float_calib_top1 = top1(model, eval_batches)
        macs = count_macs(qmodel, eval_batches[0][0])
        result.steps = accuracy_search(qmodel, eval_batches, result.float_calib_top1, hists, max_drop,
                                       bit_candidates, metric, window, macs, log)
        result.calib_top1 = top1(qmodel, eval_batches)
        result.recipe = recipe_of(qmodel, recipe)
    return result


__all__ = ["METRICS", "PTQResult", "SEARCHES", "accuracy_search", "best_act_fl", "best_weight_fl",
           "calibrate_with_histograms", "greedy_fl_search", "post_training_quantize", "recipe_of", "top1"]

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

The post-training steps of ``recipe.ptq`` run around the calibration, each in its own module:
cross-layer equalization (structural, applied by ``quantize()``: :mod:`qcnn.methods.equalize`) and high-bias
absorption before it, then the power-of-two alignment of the activations (the same module); after it the
mixed-precision search (:mod:`qcnn.methods.mixed_precision`), the weight
grids fixed (:func:`freeze_weight_grids`), learned rounding (:mod:`qcnn.methods.adaround`), DC-preserving
rounding of the spatial kernels (``keep_dc``: :mod:`qcnn.methods.kernel_sums`, after nearest or inside learned
rounding) and bias correction
(:mod:`qcnn.methods.bias_correction`; after learned rounding its float reference is the rounded weights' float
function, so that it removes the activations' shift and keeps the rounding), all on the calibration images; each
step's wall and CPU seconds are in
:attr:`PTQResult.ptq_steps`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from qcnn.calib import calibrating
from qcnn.calib.histogram import HistogramObserver
from qcnn.calib.observers import check_finite
from qcnn.data.augment import calibration_views
from qcnn.detection.task import metric_of
from qcnn.methods.adaround import adaround
from qcnn.methods.base import get_method
from qcnn.methods.bias_correction import analytic_bias_correction, empirical_bias_correction
from qcnn.methods.equalize import absorb_high_bias, align_pot_activations
from qcnn.methods.kernel_sums import keep_kernel_sums
from qcnn.methods.mixed_precision import parse_budget, sensitivity_search
from qcnn.methods.place import quantize
from qcnn.methods.regrid import METRICS, best_act_fl, best_weight_fl, restore, set_bits, snapshot
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Quantizer, check_bits
from qcnn.quant.fixed_point import FixedPointQuantizer
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Override, Recipe
from qcnn.report.size import count_macs
from qcnn.train import evaluate
from qcnn.transform import float_twin, layers_in_order

SEARCHES = ("none", "greedy", "accuracy")


@dataclass
class PTQResult:
    """What :func:`post_training_quantize` returns."""

    model: nn.Module  #: the calibrated quantized model (eval mode)
    recipe: Recipe  #: the recipe that rebuilds it (with per-layer overrides after an accuracy search)
    float_calib_top1: float | None = None  #: float top-1 on the held-out calibration split (accuracy search)
    calib_top1: float | None = None  #: quantized top-1 on that split
    steps: list[dict] = field(default_factory=list)  #: accuracy-search log (layer, kind, bits, top1, kept)
    #: the post-training steps that ran (``recipe.ptq``), each with its CPU seconds and outcome figures
    ptq_steps: dict[str, dict] = field(default_factory=dict)
    mixed_precision: object | None = None  #: the MixedPrecisionResult of a ``ptq.mixed_precision`` search


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
            continue
        if isinstance(getattr(m, "input_quant", None), Quantizer):  # QAct: the lookup table's input codes
            out.append((f"{name}.input_quant", m.input_quant))
        if hasattr(m, "out_quant") and not isinstance(m, (QConv2d, QLinear)) and isinstance(m.out_quant, Quantizer):
            out.append((f"{name}.out_quant", m.out_quant))
    return out


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
    """Top-1 (percent) of ``model`` in eval mode on a list of ``(x, y)`` batches (:func:`qcnn.train.evaluate`); for a
    detector its headline metric (mAP@0.5, points)."""
    model.eval()
    res = evaluate(model, batches)
    return float(res[metric_of(res)])


def accuracy_search(qmodel: nn.Module, eval_batches, float_top1: float, hists: dict[str, HistogramObserver],
                    max_drop: float = 0.5, bit_candidates=(8, 6, 5, 4), metric: str = "mse", window: int = 3,
                    macs: dict[str, int] | None = None, log=None, keep: set[str] | None = None) -> list[dict]:
    """Greedy bit-width descent (see module docstring). Changes ``qmodel`` in place; returns the step log.
    Layers in ``keep`` (the first/last layers under an ``8bit`` policy: :func:`policy_layers`) keep their bits."""
    cands = sorted({check_bits(b, "bit candidate") for b in bit_candidates}, reverse=True)
    keep = keep or set()
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (QConv2d, QLinear)) and n not in keep]
    floor = float_top1 - max_drop
    steps: list[dict] = []
    macs = macs or {}

    def descend(name: str, q: Quantizer, kind: str, weight, hist) -> None:
        for b in [c for c in cands if c < q.bits]:
            snap = snapshot(q)
            set_bits(q, b, weight, hist, metric, window)
            acc = top1(qmodel, eval_batches)
            kept = acc >= floor
            steps.append({"layer": name, "kind": kind, "bits": b, "top1": acc, "kept": kept})
            if log is not None:
                log(f"  {name} {kind} {b} bits: top1 {acc:.2f} ({'kept' if kept else 'reverted'})")
            if not kept:
                restore(q, snap)
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


def policy_layers(qmodel: nn.Module, recipe: Recipe) -> set[str]:
    """The first and last quantized layers when ``recipe.first_last`` fixes their bits (``8bit``; ``fp32``
    leaves them float): searches over bit widths must not change them."""
    if recipe.first_last == "same":
        return set()
    gm = qmodel if isinstance(qmodel, fx.GraphModule) else None
    names = [n for n, _ in layers_in_order(qmodel, gm)]
    return {names[0], names[-1]} if names else set()


class _Steps:
    """Runs the post-training steps of ``recipe.ptq`` and records each one's wall and CPU (process) seconds
    and outcome."""

    def __init__(self, log):
        self.log, self.record = log, {}

    def run(self, name: str, fn, *args, **kwargs):
        t0, w0 = time.process_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        self.record.setdefault(name, {}).update(cpu_seconds=round(time.process_time() - t0, 2),
                                                seconds=round(time.perf_counter() - w0, 2))
        if self.log is not None:
            self.log(f"  ptq step {name}: {self.record[name]['seconds']} s ({self.record[name]['cpu_seconds']} s CPU)")
        return out


@torch.no_grad()
def freeze_weight_grids(qmodel: nn.Module, x: Tensor) -> int:
    """Fix every dynamic uniform weight grid at its current value (one forward on ``x`` first): the weights
    do not change in the steps after calibration (bias correction writes biases; learned rounding freezes its
    own grids), so the per-call range (an MSE search with ``weight_range: mse``) need not be recomputed at
    every forward. Returns how many were frozen (saved in the state_dict, so a checkpoint keeps them)."""
    qmodel.eval()(x)
    n = 0
    for m in qmodel.modules():
        q = getattr(m, "weight_quant", None) if isinstance(m, (QConv2d, QLinear)) else None
        if isinstance(q, UniformQuantizer) and q.dynamic and not q._frozen:
            q.freeze()
            n += 1
    return n


def _round_and_correct(steps: _Steps, qmodel, twin, model, calib_batches, spec) -> None:
    """Learned rounding (AdaRound / BRECQ) then bias correction, as ``spec`` asks."""
    if spec.round != "nearest":
        rep = steps.run(spec.round, adaround, qmodel, twin, calib_batches,
                        mode="layer" if spec.round == "adaround" else "block",
                        iterations=spec.round_iterations, drop_prob=spec.round_drop_prob, act_lr=spec.round_act_lr,
                        lr=spec.round_lr, keep_dc=spec.keep_dc)
        steps.record[spec.round].update(
            flipped=sum(rep.flipped.values()) / max(len(rep.flipped), 1),
            undecided=sum(rep.undecided.values()) / max(len(rep.undecided), 1),
            recon_mse_nearest=sum(rep.recon_mse_nearest.values()),
            recon_mse_learned=sum(rep.recon_mse_learned.values()))
        if rep.act_steps:
            steps.record[spec.round]["act_steps"] = len(rep.act_steps)
            steps.record[spec.round]["act_step_ratio"] = sum(b / a for a, b in rep.act_steps.values()) / len(
                rep.act_steps)
    elif spec.keep_dc:
        rep = steps.run("keep_dc", keep_kernel_sums, qmodel)
        steps.record["keep_dc"].update(layers=len(rep.moved), sum_error_before=max(rep.before.values(), default=0.0),
                                       sum_error_after=max(rep.after.values(), default=0.0))
    if spec.bias_correction == "empirical":
        # the reference is the float function of the weights as they are now, as the analytic form's is: after
        # learned rounding, the rounded ones. Against the original float weights the correction undid the
        # rounding's compensation of earlier layers' errors (measured: ResNet-20 W4A4 BRECQ 0.45 -> 1.88 points;
        # -0.13 against the rounded weights); after nearest rounding the two are the same weights
        # (keep_dc after nearest rounding compensates nothing: its reference stays the float weights, ``twin``)
        ref = float_twin(qmodel) if spec.round != "nearest" else twin
        shifts = steps.run("bias_correction", empirical_bias_correction, qmodel, ref, calib_batches)
        steps.record["bias_correction"]["max_shift"] = max(shifts.values(), default=0.0)
    elif spec.bias_correction == "analytic":
        how = steps.run("bias_correction", analytic_bias_correction, qmodel, model, calib_batches)
        steps.record["bias_correction"]["analytic_layers"] = sum(v == "analytic" for v in how.values())


def _mixed_precision(steps: _Steps, qmodel, twin, calib_batches, recipe: Recipe):
    spec = recipe.ptq
    res = steps.run("mixed_precision", sensitivity_search, qmodel, twin, calib_batches, spec.mixed_precision,
                    candidates=tuple(spec.mp_candidates), keep=policy_layers(qmodel, recipe))
    steps.record["mixed_precision"].update(budget=res.budget, budget_kind=res.budget_kind, achieved=res.achieved)
    return res


def post_training_quantize(model: nn.Module, recipe: Recipe, calib_loader, search: str = "none",
                           metric: str = "mse", max_drop: float = 0.5, bit_candidates=(8, 6, 5, 4),
                           window: int = 3, eval_images: int = 2000, log=None) -> PTQResult:
    """Quantize the float ``model`` without training (see module docstring).

    ``calib_loader`` yields ``(x, y)`` batches of the held-out calibration split (never the test set): the
    first ``recipe.calib_images`` images calibrate (and drive the steps of ``recipe.ptq``), up to
    ``eval_images`` score the accuracy search.
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
    spec = recipe.ptq
    if spec.mixed_precision and search == "accuracy":
        raise ValueError("ptq: mixed_precision and search='accuracy' both choose per-layer bit widths: pick one")
    if spec.mixed_precision:
        parse_budget(spec.mixed_precision)  # a malformed budget is refused before any work
    recipe = dataclasses.replace(recipe, fold_bn=True)
    model = model.eval()
    steps = _Steps(log)
    qmodel = steps.run("quantize" + ("+equalize" if spec.equalize else ""), quantize, model, recipe).eval()
    n_images = max(recipe.calib_images, eval_images if search == "accuracy" else 0)
    batches = _batches(calib_loader, n_images)
    calib_batches = _batches(batches, recipe.calib_images)
    if spec.calib_augment:
        calib_batches = [(v, y) for x, y in calib_batches for v in calibration_views(x, spec.calib_augment)]
        steps.record["calib_augment"] = {"images": sum(x.shape[0] for x, _ in calib_batches)}
    if spec.equalize and spec.absorb_bias:
        n = steps.run("absorb_bias", absorb_high_bias, qmodel, calib_batches)
        steps.record["absorb_bias"]["channels"] = int(n)
    if spec.pot_align:
        rep = steps.run("pot_align", align_pot_activations, qmodel, calib_batches)
        steps.record["pot_align"].update(pairs=len(rep.pairs), streams=len(rep.streams))
    twin = float_twin(qmodel) if (spec.round != "nearest" or spec.bias_correction or spec.mixed_precision) else None
    want_hists = fl_search and search != "none"
    hists = steps.run("calibrate", calibrate_with_histograms, qmodel, calib_batches, record=want_hists)
    if search in ("greedy", "accuracy") and fl_search:
        greedy_fl_search(qmodel, hists, metric, window)
    result = PTQResult(qmodel, recipe)
    if spec.mixed_precision:
        result.mixed_precision = _mixed_precision(steps, qmodel, twin, calib_batches, recipe)
        result.recipe = recipe_of(qmodel, recipe)
    if spec.round != "nearest" or spec.bias_correction or spec.keep_dc:
        steps.run("freeze_weight_grids", freeze_weight_grids, qmodel, calib_batches[0][0])
    _round_and_correct(steps, qmodel, twin, model, calib_batches, spec)
    if search == "accuracy":
        eval_batches = _batches(batches, eval_images)
        result.float_calib_top1 = top1(model, eval_batches)
        macs = count_macs(qmodel, eval_batches[0][0])
        result.steps = accuracy_search(qmodel, eval_batches, result.float_calib_top1, hists, max_drop,
                                       bit_candidates, metric, window, macs, log,
                                       keep=policy_layers(qmodel, recipe))
        result.calib_top1 = top1(qmodel, eval_batches)
        result.recipe = recipe_of(qmodel, recipe)
    result.ptq_steps = steps.record
    return result


__all__ = [
    "METRICS",
    "PTQResult",
    "SEARCHES",
    "accuracy_search",
    "best_act_fl",
    "best_weight_fl",
    "calibrate_with_histograms",
    "freeze_weight_grids",
    "greedy_fl_search",
    "policy_layers",
    "post_training_quantize",
    "recipe_of",
    "top1",
]

"""CLIP-Q procedure (Tung & Mori, CVPR 2018): Bayesian optimisation of per-layer (p, b), then fine-tuning.

The quantizer itself (clip, partition, quantize to interval means; straight-through to the full-precision
weights) is :class:`qcnn.quant.codebook.ClipQQuantizer`. This module chooses each layer's clipping fraction
``p`` and bits ``b``, then trains the network with them.

Search (per layer, as in the paper; one ``optuna`` study per layer, GP sampler ``optuna.samplers.GPSampler``
or TPE, seeded). For layer ``l`` only that layer is quantized (every other conv/linear layer is float) and a
trial ``(p, b)`` is scored directly, without fine-tuning, on the first ``eval_images`` images of the held-out
calibration split ``bundle.calib`` (never the test set)::

    objective_l(p, b) = err_l(p, b) - lambda * c_l(p, b)
    c_l = n_l * (32 - bpw(p, b)) / (32 * N)          # share of all fp32 conv/linear weight bits saved
    bpw(p, b) = min(b, 1 + (1 - p) b)                 # dense b-bit codes, or bitmask + b bits per non-zero

with ``n_l`` the layer's weights and ``N`` those of all quantized layers. ``err`` is the top-1 error (a
fraction). Every trial's ``(err, bpw)`` is kept; the final choice per layer minimises the objective over its
trials. With ``target_ratio`` set, ``lambda`` is raised (doubling, then bisection) over the recorded trials
until the estimated weight compression ``32 N / sum_l n_l bpw_l`` reaches the target: a Lagrangian choice
among the measured configurations, no extra evaluation.

Fine-tuning: ``recipe.train`` on ``bundle.train`` (first ``train_images`` images if set), with the chosen
``(p, b)``; the quantized copy is recomputed every step while the full-precision weights learn.

``procedure_params`` (all optional): ``search`` (bool, default true; false uses ``params`` as given),
``trials`` (per layer, 12), ``startup_trials`` (random trials before the GP, 4), ``lam`` (0.5),
``target_ratio`` (None), ``p_range`` ([0.0, 0.9]), ``bits_range`` ([2, 4]), ``eval_images`` (1000),
``sampler`` (``gp`` or ``tpe``), ``seed`` (0), ``train_images`` (None = all), ``layers`` (None).

``layers`` reuses an earlier search: a path to the ``clipq_layers.json`` a run wrote (relative to the working
directory), or the per-layer table inline (``[{name, p, bits}]`` or ``{name: {p, bits}}``). Every CLIP-Q layer
of the model then gets exactly its ``(p, b)`` and no search runs (``optuna`` is not imported); a name in the
table that is not a CLIP-Q layer of the model, or a layer of the model missing from the table, is a
``ValueError`` naming it. ``OUT/clipq_layers.json`` also keeps every search trial (``records``), so that the
Lagrangian choice can be redone for another target offline.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qcnn.calib.batchnorm import reestimate_bn
from qcnn.io import write_text
from qcnn.methods import quantize_and_calibrate, register_procedure, train_quantized
from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.quant.base import Quantizer, check_bits
from qcnn.quant.codebook import ClipQQuantizer, check_p
from qcnn.recipes import Recipe, checked_fields
from qcnn.train import evaluate


@dataclass
class ClipQOptions:
    #: clipping fraction p of every layer without a per-layer entry
    p: float = 0.5
    #: per-layer (p, b): {fnmatch pattern: [p, bits]} (or {p: .., bits: ..}); later entries win
    layers: dict = field(default_factory=dict)
    #: remove the clipped gap before partitioning (see module docstring)
    gapless: bool = False
    #: training-mode calls between two partitions (the sort) of each layer's weights (1: every call, exact
    #: resume; N > 1 looks weights up in the last partition in between, see ClipQQuantizer)
    refresh_every: int = 1

    def __post_init__(self):
        check_p(self.p)
        if not isinstance(self.layers, dict):
            raise ValueError(f"layers={self.layers!r} must be a mapping {{pattern: [p, bits]}}")
        for pat, v in self.layers.items():
            p, b = _parse_layer_entry(pat, v)
            if p is not None:
                check_p(p, f"p of layer pattern {pat!r}")
            if b is not None:
                check_bits(b, f"bits of layer pattern {pat!r}")


def _parse_layer_entry(pat: str, v) -> tuple[float | None, int | None]:
    if isinstance(v, dict):
        bad = sorted(set(v) - {"p", "bits"})
        if bad:
            raise ValueError(f"unknown key(s) {bad} for layer pattern {pat!r}; valid keys: ['bits', 'p']")
        return v.get("p"), v.get("bits")
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return v[0], v[1]
    raise ValueError(f"layer pattern {pat!r}: expected [p, bits] or {{p: .., bits: ..}}, got {v!r}")


def layer_params(options: ClipQOptions, name: str, default_bits: int) -> tuple[float, int]:
    """(p, bits) of layer ``name``: the options' per-layer entries, else ``options.p`` and ``default_bits``."""
    p, b = options.p, default_bits
    for pat, v in options.layers.items():
        if fnmatch.fnmatchcase(name, pat):
            lp, lb = _parse_layer_entry(pat, v)
            p = lp if lp is not None else p
            b = lb if lb is not None else b
    return float(p), int(b)


class ClipQMethod(Method):
    """CLIP-Q: per-layer clip/partition/quantize weights; activations float (the paper, ``a_bits: null``) or
    uniform at the recipe's ``a_bits``.

    The bits ``b`` of a layer are the recipe's ``w_bits`` (with its overrides and first/last policy) unless
    ``params.layers`` names the layer.
    """

    name = "clipq"
    Options = ClipQOptions

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        p, b = layer_params(self.options, ctx.name, ctx.w_bits)
        return ClipQQuantizer(b, p, gapless=self.options.gapless, refresh_every=self.options.refresh_every)


register_method(ClipQMethod)



@dataclass
class SearchOptions:
    search: bool = True
    trials: int = 12
    startup_trials: int = 4
    lam: float = 0.5
    target_ratio: float | None = None
    p_range: list = field(default_factory=lambda: [0.0, 0.9])
    bits_range: list = field(default_factory=lambda: [2, 4])
    eval_images: int = 1000
    sampler: str = "gp"
    seed: int = 0
    train_images: int | None = None
    layers: str | list | dict | None = None

    def __post_init__(self):
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials={self.trials!r} must be a positive integer")
        if self.sampler not in ("gp", "tpe"):
            raise ValueError(f"sampler={self.sampler!r} is not one of ['gp', 'tpe']")
        lo, hi = self.p_range
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"p_range={self.p_range!r} must satisfy 0 <= lo <= hi < 1")
        blo, bhi = self.bits_range
        if not 1 <= blo <= bhi <= 8:
            raise ValueError(f"bits_range={self.bits_range!r} must satisfy 1 <= lo <= hi <= 8")
        if self.eval_images < 1:
            raise ValueError(f"eval_images={self.eval_images!r} must be positive")
        if self.layers is not None and not isinstance(self.layers, (str, Path, list, dict)):
            raise ValueError(f"layers={self.layers!r} must be a JSON file path, a list or a mapping")

    @classmethod
    def from_dict(cls, d: dict | None) -> SearchOptions:
        return cls(**checked_fields(cls, d, "procedure_params of clipq", unknown="unknown procedure_params"))


def bits_per_weight(p: float, bits: int) -> float:
    """Estimated stored bits per weight: dense ``b``-bit codes or a bitmask plus ``b`` bits per non-zero."""
    return min(float(bits), 1.0 + (1.0 - p) * bits)


def clipq_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the layers whose weight quantizer is a :class:`ClipQQuantizer`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight_quant", None), ClipQQuantizer)]


def _error(model: nn.Module, batches: list) -> float:
    """Top-1 error (a fraction) on a list of batches, in eval mode."""
    return 1.0 - float(evaluate(model, batches)["top1"]) / 100.0


def _make_sampler(opts: SearchOptions, layer_index: int = 0):
    """The study's sampler, seeded with ``seed + layer_index`` (a different random start per layer)."""
    import optuna

    seed = opts.seed + layer_index
    if opts.sampler == "gp":
        try:
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=opts.startup_trials)
        except (ImportError, AttributeError):  # older optuna or no scipy: fall back to TPE
            pass
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=opts.startup_trials)


def _choose(records: dict, sizes: dict, lam: float) -> dict:
    total = sum(sizes.values())
    out = {}
    for name, trials in records.items():
        def score(t, name=name):
            return t["err"] - lam * sizes[name] * (32.0 - t["bpw"]) / (32.0 * total)

        out[name] = min(trials, key=score)
    return out


def _ratio(choice: dict, sizes: dict) -> float:
    return 32.0 * sum(sizes.values()) / sum(sizes[n] * choice[n]["bpw"] for n in choice)


def select(records: dict, sizes: dict, lam: float, target_ratio: float | None = None) -> tuple[dict, float]:
    """Per-layer choice among recorded trials for ``lam`` (raised until ``target_ratio`` is met, if given)."""
    choice = _choose(records, sizes, lam)
    if target_ratio is None or _ratio(choice, sizes) >= target_ratio:
        return choice, lam
    lo, hi = lam, max(lam, 1e-3)
    for _ in range(40):
        hi *= 2
        if _ratio(_choose(records, sizes, hi), sizes) >= target_ratio:
            break
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if _ratio(_choose(records, sizes, mid), sizes) >= target_ratio:
            hi = mid
        else:
            lo = mid
    return _choose(records, sizes, hi), hi


def search(qmodel: nn.Module, loader, opts: SearchOptions, log=print) -> dict:
    """Per-layer Bayesian optimisation of (p, b) (see module docstring).

    Returns ``{"layers": {name: {"p", "bits", "err", "bpw"}}, "lam": lam, "studies": {name: optuna.Study},
    "float_err": e, "records": {name: [trial dicts]}}``.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    layers = clipq_layers(qmodel)
    if not layers:
        raise ValueError("the model has no CLIP-Q layer: quantize it with method 'clipq' first")
    batches, seen = [], 0
    for x, y in loader:
        batches.append((x, y))
        seen += y.numel()
        if seen >= opts.eval_images:
            break
    if seen == 0:
        raise ValueError("the search set (bundle.calib) is empty")
    was_training = qmodel.training
    qmodel.eval()
    quants = {n: m.weight_quant for n, m in layers}
    sizes = {n: m.weight.numel() for n, m in layers}
    for _, m in layers:
        m.weight_quant = None
    float_err = _error(qmodel, batches)
    log(f"clipq search: float error {100 * float_err:.2f}% on {seen} calibration images")
    records, studies = {}, {}
    try:
        for i, (name, m) in enumerate(layers):
            q = quants[name]
            m.weight_quant = q
            recs = []

            def objective(trial, q=q, name=name, recs=recs):
                p = trial.suggest_float("p", *opts.p_range)
                b = trial.suggest_int("bits", *opts.bits_range)
                q.set_params(p, b)
                err = _error(qmodel, batches)
                bpw = bits_per_weight(p, b)
                recs.append({"p": p, "bits": b, "err": err, "bpw": bpw})
                return err - opts.lam * sizes[name] * (32.0 - bpw) / (32.0 * sum(sizes.values()))

            study = optuna.create_study(direction="minimize", sampler=_make_sampler(opts, i))
            study.optimize(objective, n_trials=opts.trials)
            records[name], studies[name] = recs, study
            best = min(recs, key=lambda t: t["err"])
            log(f"  {name:<24} {len(study.trials)} trials, best err {100 * best['err']:.2f}% at "
                f"p={best['p']:.2f} b={best['bits']}")
            m.weight_quant = None
    finally:
        for name, m in layers:
            m.weight_quant = quants[name]
    choice, lam = select(records, sizes, opts.lam, opts.target_ratio)
    for name, m in layers:
        m.weight_quant.set_params(choice[name]["p"], choice[name]["bits"])
    qmodel.train(was_training)
    return {"layers": choice, "lam": lam, "studies": studies, "float_err": float_err, "records": records,
            "estimated_ratio": _ratio(choice, sizes)}


def read_layers(spec) -> dict[str, tuple[float, int]]:
    """Per-layer ``{name: (p, bits)}`` from ``procedure_params.layers``.

    ``spec`` is a path (relative to the working directory) of a ``clipq_layers.json`` written by an earlier
    run (``{"layers": [{"name", "p", "bits", ...}], ...}``), or the same content inline: a list of
    ``{"name", "p", "bits"}`` rows, a mapping ``{"layers": [...]}`` or a mapping ``{name: {p, bits}}`` /
    ``{name: [p, bits]}``.
    """
    where = "layers"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"layers={str(spec)!r}: no such file (a clipq_layers.json of an earlier run)")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"layers={str(path)!r} is not valid JSON: {e}") from None
        where = f"layers file {str(path)!r}"
    if isinstance(spec, dict) and isinstance(spec.get("layers"), list):
        spec = spec["layers"]
    out: dict[str, tuple[float, int]] = {}
    if isinstance(spec, list):
        for row in spec:
            if not isinstance(row, dict) or not {"name", "p", "bits"} <= set(row):
                raise ValueError(f"{where}: entry {row!r} needs 'name', 'p' and 'bits'")
            out[str(row["name"])] = (row["p"], row["bits"])
    elif isinstance(spec, dict):
        for name, v in spec.items():
            if isinstance(v, dict) and {"p", "bits"} <= set(v):
                out[str(name)] = (v["p"], v["bits"])
            elif isinstance(v, (list, tuple)) and len(v) == 2:
                out[str(name)] = (v[0], v[1])
            else:
                raise ValueError(f"{where}: layer {name!r} needs {{p: .., bits: ..}} or [p, bits], got {v!r}")
    else:
        raise ValueError(f"{where}: expected a list of {{name, p, bits}} or a mapping, got {type(spec).__name__}")
    for name, (p, b) in out.items():
        check_p(p, f"p of layer {name!r} ({where})")
        check_bits(b, f"bits of layer {name!r} ({where})")
        out[name] = (float(p), int(b))
    return out


def apply_layers(qmodel: nn.Module, table: dict[str, tuple[float, int]]) -> None:
    """Give every CLIP-Q layer its ``(p, bits)`` from ``table``; the two sets of names must match."""
    layers = dict(clipq_layers(qmodel))
    unknown = [n for n in table if n not in layers]
    if unknown:
        raise ValueError(f"clipq layers: {unknown} not CLIP-Q layers of the model (it has {sorted(layers)})")
    missing = [n for n in layers if n not in table]
    if missing:
        raise ValueError(f"clipq layers: model layer(s) {missing} have no (p, bits) entry")
    for name, m in layers.items():
        m.weight_quant.set_params(*table[name])


def layer_table(qmodel: nn.Module) -> list[dict]:
    """Per-layer (p, b), weight count and measured zero fraction of a CLIP-Q model."""
    rows = []
    with torch.no_grad():
        for name, m in clipq_layers(qmodel):
            m.weight_quant.refresh()  # the partition of the current weights, whatever the refresh schedule
            wq = m.weight_quant(m.weight)
            rows.append({"name": name, "p": round(float(m.weight_quant.p), 4), "bits": m.weight_quant.bits,
                         "numel": m.weight.numel(), "zero_fraction": round(float((wq == 0).float().mean()), 4),
                         "levels": int(torch.unique(wq).numel())})
    return rows


@register_procedure("clipq")
def clipq(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
          resume: bool = False) -> tuple[nn.Module, dict]:
    """Quantize with CLIP-Q, search per-layer (p, b) on ``bundle.calib``, then fine-tune."""
    opts = SearchOptions.from_dict(recipe.procedure_params)
    qmodel = quantize_and_calibrate(model, recipe, bundle)
    metrics: dict = {}
    records = None
    if opts.layers is not None:  # (p, b) of an earlier search: no search, no optuna
        apply_layers(qmodel, read_layers(opts.layers))
        metrics["layers_from"] = str(opts.layers) if isinstance(opts.layers, (str, Path)) else "inline"
    elif opts.search and not resume:
        if bundle.calib is None:
            raise ValueError("clipq search needs a calibration split (bundle.calib is None: calib_size=0)")
        res = search(qmodel, bundle.calib, opts)
        metrics["search"] = {"lam": res["lam"], "float_err": res["float_err"], "trials_per_layer": opts.trials,
                             "estimated_ratio": res["estimated_ratio"], "sampler": opts.sampler}
        records = {n: [{k: t[k] for k in ("p", "bits", "err", "bpw")} for t in recs]
                   for n, recs in res["records"].items()}
    if recipe.train.epochs > 0:
        if bundle.calib is not None and not resume:  # BN statistics of the searched (p, b) grids
            reestimate_bn(qmodel, bundle.calib, recipe.calib_images)
        ft = bundle
        if opts.train_images is not None:
            ft = dataclasses.replace(bundle, train=bundle.train.take(opts.train_images))
        metrics.update(train_quantized(qmodel, ft, recipe, out_dir, resume) or {})
    table = layer_table(qmodel)
    metrics["clipq_layers"] = table
    if out_dir is not None:
        path = Path(out_dir) / "clipq_layers.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"layers": table, "search": metrics.get("search")}
        if records is not None:
            doc["records"] = records
        write_text(path, json.dumps(doc, indent=1))
    n = sum(r["numel"] for r in table)
    metrics["clipq_bits_per_weight"] = sum(r["numel"] * bits_per_weight(r["p"], r["bits"]) for r in table) / max(n, 1)
    if not math.isfinite(metrics["clipq_bits_per_weight"]):
        raise ValueError("clipq: no layer was quantized")
    return qmodel, metrics


__all__ = ["SearchOptions", "apply_layers", "bits_per_weight", "clipq", "clipq_layers", "layer_table", "read_layers",
           "search", "select"]

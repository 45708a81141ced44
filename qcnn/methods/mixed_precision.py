"""Mixed precision by measured sensitivity under a weight-size or BOPs budget (post-training, no training).

Hessian-aware methods (HAWQ, Dong et al., ICCV 2019; HAWQ-V2/V3) rank layers by a second-order proxy,
``Omega_l = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2``. This module uses the simpler *measured* proxy of the
per-layer sensitivity analyses of Brevitas and AIMET: the noise that quantizing one layer at ``b`` bits adds
to the network's output, measured on the calibration batches against the float model's logits.

1. **Sensitivity.** Let ``z`` be the float model's logits on the calibration batches (computed once) and
   ``z_c`` those of the quantized model in configuration ``c``. The start configuration ``c_0`` puts every
   searchable layer at the highest candidate ``b_max`` (layers in ``keep`` stay as they are). For each
   searchable layer ``l`` and candidate ``b < b_max``, only layer ``l``'s weight quantizer is set to ``b``
   bits (its grid re-chosen for the new width: QCode fl by the weight-MSE window search, uniform range from
   the weight; with ``act_bits_fixed=False`` its input quantizer too), and

       N_l(b) = mean((z_{c_0 with l at b} - z)^2),        N_l(b_max) = N_0 = mean((z_{c_0} - z)^2).

   The layer is then restored: ``layers * (candidates - 1) + 1`` evaluations in all. ``sensitivity`` reports
   ``N_l(b)`` (``kind_metric="mse"``) or ``-SQNR_l(b) = 10 log10(N_l(b) / P)`` dB, ``P = mean(z^2)``
   (``kind_metric="sqnr"``); lower is better either way.
2. **Choice.** Quantization noises of different layers are treated as independent and additive at the
   output, so a configuration ``c = (b_l)`` is predicted to give ``N(c) = N_0 + sum_l (N_l(b_l) - N_0)``.
   The resource is the weight size ``S(c) = sum_l n_l b_l / 8`` bytes (``n_l`` = weights of layer ``l``;
   biases and activations not counted) or ``BOPs(c) = sum_l MACs_l b_l a_l`` (``a_l`` = the layer's input
   bits, 32 if float). A greedy Lagrangian descent from ``c_0`` repeatedly takes the move (one layer, to any
   lower candidate) with the smallest noise increase per byte (or BOP) saved,
   ``(N_l(b') - N_l(b_l)) / (R_l(b_l) - R_l(b'))``, down to every layer at the lowest candidate; that path
   is the predicted Pareto curve. The chosen configuration is the first point of the path within the
   budget, then "refilled": while some layer can be raised to a higher candidate without leaving the
   budget, the raise with the largest noise decrease per extra byte (BOP) is taken. A budget below the
   all-lowest configuration raises ValueError stating that minimum.
3. **Pareto curve.** Every step of the path is a point ``{size, bops, predicted_sqnr_db, bits}``; for up
   to ``measure_points`` evenly spaced points and the chosen configuration the configuration is applied and
   the real logit SQNR ``10 log10(P / N(c))`` measured (``sqnr_db``; None where not measured).
4. The chosen bits are applied to ``qmodel`` in place; :func:`qcnn.methods.ptq.recipe_of` turns them into a
   Recipe with one override per layer.

Budgets (:func:`parse_budget`): ``size:<n><unit>`` with decimal ``B``/``KB``/``MB``/``GB`` (1000^k bytes)
or binary ``KiB``/``MiB``/``GiB`` (1024^k bytes), ``bops:<n>[K|M|G|T]`` (1000^k), and ``<f>x`` /
``size:<f>x`` / ``bops:<f>x``: a fraction of the start configuration ``c_0`` (every searchable layer at the
highest candidate). Units are case-insensitive; ``B`` always means bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qcnn.methods.regrid import restore, set_bits, snapshot
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Quantizer, check_bits
from qcnn.quant.fixed_point import FixedPointQuantizer
from qcnn.quant.uniform import UniformQuantizer
from qcnn.report.size import FLOAT_BITS, count_macs

KINDS = ("size", "bops")
METRICS = ("sqnr", "mse")
SIZE_UNITS = {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024.0, "mib": 1024.0**2,
              "gib": 1024.0**3}
BOPS_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS = {"size": SIZE_UNITS, "bops": BOPS_UNITS}
_BUDGET = re.compile(r"^\s*(?:(?P<kind>[a-z]+)\s*:)?\s*(?P<num>(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*"
                     r"(?P<unit>[a-z]*)\s*$", re.IGNORECASE)
_SEARCHABLE = (FixedPointQuantizer, UniformQuantizer)
_RESOURCES = {"size": lambda lay, w, a: lay.params * w / 8, "bops": lambda lay, w, a: float(lay.macs * w * a)}


@dataclass
class MixedPrecisionResult:
    """What :func:`sensitivity_search` returns (plain data: :mod:`qcnn.report.pareto` plots it)."""

    bits: dict[str, tuple[int, int | None]]  #: layer -> (w_bits, a_bits) chosen (kept layers included)
    sensitivity: dict[str, dict[int, float]]  #: layer -> {w_bits candidate: measured cost}
    budget: float  #: the budget resolved to bytes (size) or BOPs
    budget_kind: str  #: "size" (bytes of weights) or "bops"
    achieved: float  #: size / BOPs of the chosen configuration
    pareto: list[dict] = field(default_factory=list)  #: greedy path (see module docstring)
    sqnr_db: float | None = None  #: measured logit SQNR of the chosen configuration
    params: dict[str, int] = field(default_factory=dict)  #: layer -> weights
    macs: dict[str, int] = field(default_factory=dict)  #: layer -> MACs per image
    candidates: tuple[int, ...] = ()  #: weight-bit candidates, highest first
    metric: str = "sqnr"  #: unit of ``sensitivity``: "sqnr" (-dB) or "mse"


def _bad_budget(text, why: str) -> ValueError:
    return ValueError(f"budget {text!r} is not understood: {why}. Expected 'size:1.2MB', 'size:300KiB', "
                      "'size:250000' (bytes), 'bops:2.5G' or '0.5x' (fraction of the start configuration)")


def parse_budget(text: str) -> tuple[str, float]:
    """``text`` -> ``(kind, value)``: ``("size", bytes)``, ``("bops", BOPs)``, or ``("size_x", f)`` /
    ``("bops_x", f)`` for a fraction ``f`` of the start configuration (units: module docstring)."""
    m = _BUDGET.match(text) if isinstance(text, str) else None
    if m is None:
        raise _bad_budget(text, "no number with a unit found")
    kind, unit, value = (m["kind"] or "").lower(), m["unit"].lower(), float(m["num"])
    if not (math.isfinite(value) and value > 0):
        raise _bad_budget(text, "the value must be a positive finite number")
    if kind and kind not in _UNITS:
        raise _bad_budget(text, f"unknown kind {m['kind']!r}; choose one of {KINDS}")
    if unit == "x":
        return f"{kind or 'size'}_x", value
    if not kind:
        if not unit or unit not in SIZE_UNITS:
            raise _bad_budget(text, "say which budget it is ('size:' or 'bops:')")
        kind = "size"
    if unit not in _UNITS[kind]:
        raise _bad_budget(text, f"unknown {kind} unit {m['unit']!r}; choose one of "
                                f"{[u for u in _UNITS[kind] if u]} (case-insensitive)")
    return kind, value * _UNITS[kind][unit]


def _budget_of(budget) -> tuple[str, float]:
    if isinstance(budget, str):
        return parse_budget(budget)
    if not (isinstance(budget, tuple) and len(budget) == 2):
        raise ValueError(f"budget {budget!r} must be a string such as 'size:300KB' or a (kind, value) tuple")
    kind, value = budget
    if kind not in (*KINDS, *(f"{k}_x" for k in KINDS)) or not (isinstance(value, (int, float))
                                                                 and math.isfinite(value) and value > 0):
        raise ValueError(f"budget {budget!r}: kind must be one of {KINDS} (or '<kind>_x') and the value a "
                         "positive number")
    return kind, float(value)


def _changeable(q) -> bool:
    """A QCode or uniform quantizer whose grid follows its bits (not one frozen on its grid, e.g. AdaRound)."""
    return isinstance(q, _SEARCHABLE) and not getattr(q, "_frozen", False)  # host flag: no device read


# -- the model side: layers, applying bits, measuring the output noise ---------------------------------
@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: int
    macs: int
    a_bits: int  #: current input bits (FLOAT_BITS if float)
    w_snap: dict  #: the weight quantizer as given
    a_snap: dict | None  #: the input quantizer as given (None if float)

    @property
    def w_bits(self) -> int:
        return int(self.w_snap["bits"])


def _quantized_layers(qmodel: nn.Module, keep: set[str]) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in qmodel.named_modules()
              if isinstance(m, (QConv2d, QLinear)) and isinstance(m.weight_quant, Quantizer)]
    unknown = sorted(set(keep) - {n for n, _ in layers})
    if unknown:
        raise ValueError(f"keep names {unknown} that are not quantized layers; layers: {[n for n, _ in layers]}")
    for name, m in layers:
        if name not in keep and not _changeable(m.weight_quant):
            raise ValueError(f"layer {name!r}: the bits of its {type(m.weight_quant).__name__} weight quantizer "
                             "cannot be changed by the search (not QCode / uniform, or its grid is frozen, e.g. "
                             "by AdaRound: search bits before rounding); put it in keep")
    if not [n for n, _ in layers if n not in keep]:
        raise ValueError("no layer to search: the model has no quantized layer outside keep")
    return layers


def _collect(qmodel: nn.Module, keep: set[str], example: Tensor) -> list[_Layer]:
    layers = _quantized_layers(qmodel, keep)
    macs = count_macs(qmodel, example)
    out = []
    for name, m in layers:
        aq = m.input_quant if isinstance(m.input_quant, Quantizer) else None
        out.append(_Layer(name, m, m.weight.numel(), macs.get(name, 0), aq.bits if aq else FLOAT_BITS,
                          snapshot(m.weight_quant), snapshot(aq) if aq else None))
    return out


def _set_layer(layer: _Layer, b: int, act_too: bool) -> None:
    """Layer's weight (and, with ``act_too``, input) quantizer at ``b`` bits; at its own bits, as given."""
    m = layer.module
    targets = [(m.weight_quant, m.weight, layer.w_snap)]
    if act_too and layer.a_snap is not None:
        targets.append((m.input_quant, None, layer.a_snap))
    for q, weight, snap in targets:
        if b == snap["bits"]:
            restore(q, snap)
        else:
            set_bits(q, b, weight)


def _inputs(batches) -> list[Tensor]:
    xs = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not xs:
        raise ValueError("the calibration set is empty: no batch was seen")
    return xs


@torch.no_grad()
def _noise(model: nn.Module, xs: list[Tensor], refs: list[Tensor]) -> float:
    """Mean squared error of ``model``'s outputs against ``refs`` over all logits."""
    model.eval()
    se, n = 0.0, 0
    for x, r in zip(xs, refs):
        d = model(x).float() - r
        se += float(d.pow(2).sum())
        n += d.numel()
    return se / n


def _db(power: float, noise: float) -> float:
    return 10.0 * math.log10(power / max(noise, power * 1e-30))


@torch.no_grad()
def logit_sqnr_db(qmodel: nn.Module, float_model: nn.Module, batches) -> float:
    """``10 log10(sum z^2 / sum (z_q - z)^2)`` of the quantized logits ``z_q`` against the float ``z``."""
    xs = _inputs(batches)
    float_model.eval()
    refs = [float_model(x).float() for x in xs]
    return _db(sum(float(r.pow(2).sum()) for r in refs) / sum(r.numel() for r in refs), _noise(qmodel, xs, refs))


def apply_bits(qmodel: nn.Module, bits: dict[str, int], act_bits_fixed: bool = True) -> None:
    """Set the weight bits (and input bits unless ``act_bits_fixed``) of the named layers, re-choosing each
    changed grid for its new width (:func:`set_bits`)."""
    mods = dict(qmodel.named_modules())
    for name, b in bits.items():
        m = mods.get(name)
        if not isinstance(m, (QConv2d, QLinear)) or not _changeable(m.weight_quant):
            raise ValueError(f"{name!r} is not a quantized layer whose weight bits can be changed")
        b = check_bits(b, f"bits of {name!r}")
        set_bits(m.weight_quant, b, m.weight)
        if not act_bits_fixed and isinstance(m.input_quant, Quantizer):
            set_bits(m.input_quant, b)


class _Evaluator:
    """The quantized model, its layers and the cached float logits."""

    def __init__(self, qmodel, float_model, batches, keep: set[str], act_too: bool):
        self.qmodel, self.act_too, self.keep = qmodel, act_too, keep
        self.xs = _inputs(batches)
        float_model.eval()
        with torch.no_grad():
            self.refs = [float_model(x).float() for x in self.xs]
        self.power = sum(float(r.pow(2).sum()) for r in self.refs) / sum(r.numel() for r in self.refs)
        self.layers = _collect(qmodel, keep, self.xs[0])
        self.search = [lay for lay in self.layers if lay.name not in keep]
        self.current = {lay.name: lay.w_bits for lay in self.layers}
        self.base = 0.0  #: N_0, the logit MSE of the start configuration

    def apply(self, config: dict[str, int]) -> None:
        for lay in self.layers:
            if self.current[lay.name] != config[lay.name]:
                _set_layer(lay, config[lay.name], self.act_too)
                self.current[lay.name] = config[lay.name]

    def noise(self, config: dict[str, int]) -> float:
        self.apply(config)
        return _noise(self.qmodel, self.xs, self.refs)

    def a_bits(self, lay: _Layer, b: int) -> int | None:
        """Input bits of ``lay`` when its weights are at ``b`` bits (None if its input is float)."""
        if lay.a_snap is None:
            return None
        return b if self.act_too and lay.name not in self.keep else lay.a_bits

    def resource(self, kind: str, lay: _Layer, b: int) -> float:
        """Bytes of weights (``size``) or BOPs of ``lay`` at ``b`` weight bits."""
        return _RESOURCES[kind](lay, b, self.a_bits(lay, b) or FLOAT_BITS)

    def total(self, kind: str, config: dict[str, int]) -> float:
        return sum(self.resource(kind, lay, config[lay.name]) for lay in self.layers)


# -- the search ----------------------------------------------------------------------------------------
def _resolve_budget(ev: _Evaluator, budget, start: dict[str, int], lowest: dict[str, int]) -> tuple[str, float]:
    kind, value = _budget_of(budget)
    if kind.endswith("_x"):
        kind = kind[:-2]
        value *= ev.total(kind, start)
    minimum = ev.total(kind, lowest)
    if value < minimum:
        unit = " bytes" if kind == "size" else " BOPs"
        raise ValueError(f"budget {budget!r} ({value:.6g}{unit}) is below the minimum achievable {kind} "
                         f"{minimum:.6g}{unit} (every searchable layer at {min(lowest.values())} bits; kept "
                         f"layers as they are); the start configuration is {ev.total(kind, start):.6g}{unit}")
    return kind, value


def _measure_sensitivity(ev: _Evaluator, start: dict[str, int], cands: list[int], log) -> dict[str, dict]:
    """``{layer: {b: N_l(b)}}`` (logit MSE with only that layer at ``b`` bits)."""
    ev.base = ev.noise(start)
    noise: dict[str, dict[int, float]] = {}
    for lay in ev.search:
        noise[lay.name] = {cands[0]: ev.base}
        for b in cands[1:]:
            noise[lay.name][b] = ev.noise({**start, lay.name: b})
            if log is not None:
                log(f"  sensitivity {lay.name} w{b}: logit SQNR {_db(ev.power, noise[lay.name][b]):.2f} dB")
        ev.apply(start)
    return noise


def _best_move(ev, kind, config, noise, cands, up: bool, room: float = math.inf):
    """The cheapest lowering (``up=False``: least noise added per unit saved) or the best raise within
    ``room`` (``up=True``: most noise removed per unit added); None if there is none."""
    best = None
    for lay in ev.search:
        cur = config[lay.name]
        for b in (c for c in cands if (c > cur if up else c < cur)):
            delta = ev.resource(kind, lay, b) - ev.resource(kind, lay, cur)
            change = noise[lay.name][b] - noise[lay.name][cur]
            if up and (delta > room or change >= 0):
                continue
            if not up and delta >= 0:
                continue
            score = change / abs(delta) if delta else -math.inf
            if best is None or score < best[0]:
                best = (score, lay.name, b)
    return best


def _greedy_path(ev, kind, start, noise, cands) -> list[dict[str, int]]:
    path = [dict(start)]
    while (move := _best_move(ev, kind, path[-1], noise, cands, up=False)) is not None:
        path.append({**path[-1], move[1]: move[2]})
    return path


def _refill(ev, kind, config, noise, cands, budget) -> dict[str, int]:
    config = dict(config)
    while (move := _best_move(ev, kind, config, noise, cands, up=True,
                              room=budget - ev.total(kind, config))) is not None:
        config[move[1]] = move[2]
    return config


def _point(ev, config, noise) -> dict:
    pred = ev.base + sum(noise[n][b] - ev.base for n, b in config.items() if n in noise)
    return {"size": ev.total("size", config), "bops": ev.total("bops", config),
            "predicted_sqnr_db": _db(ev.power, max(pred, 0.0)), "sqnr_db": None, "bits": dict(config),
            "chosen": False, "on_path": True}


def _pareto(ev, path, chosen, noise, measure_points: int, log) -> list[dict]:
    points = [_point(ev, c, noise) for c in path]
    if chosen not in path:
        points.append({**_point(ev, chosen, noise), "on_path": False})
    k = min(measure_points, len(path))
    picks = {round(i * (len(path) - 1) / max(k - 1, 1)) for i in range(k)} if k else set()
    for i, p in enumerate(points):
        p["chosen"] = p["bits"] == chosen
        if i in picks or p["chosen"]:
            p["sqnr_db"] = _db(ev.power, ev.noise(p["bits"]))
            if log is not None:
                log(f"  pareto size {p['size']:.0f} B, {p['bops'] / 1e9:.3f} GBOPs: predicted "
                    f"{p['predicted_sqnr_db']:.2f} dB, measured {p['sqnr_db']:.2f} dB")
    return points


def sensitivity_search(qmodel: nn.Module, float_model: nn.Module, batches, budget: str | tuple,
                       candidates=(8, 6, 4), kind_metric: str = "sqnr", act_bits_fixed: bool = True,
                       log=None, keep: set[str] | None = None, measure_points: int = 8) -> MixedPrecisionResult:
    """Choose per-layer weight bits by measured output sensitivity under ``budget`` (module docstring).

    ``qmodel`` is a calibrated quantized model (``quantize`` + calibration) of ``float_model``; ``batches``
    are calibration batches (``(x, y)`` pairs or input tensors, never the test set); ``keep`` names layers
    left as they are (e.g. first/last at 8 bits). ``qmodel`` is changed in place to the chosen bits (and left
    as it was if the search fails). ``measure_points`` path points get a measured SQNR (plus the chosen one)."""
    if kind_metric not in METRICS:
        raise ValueError(f"unknown kind_metric {kind_metric!r}; choose one of {METRICS}")
    cands = sorted({check_bits(b, "bit candidate") for b in candidates}, reverse=True)
    ev = _Evaluator(qmodel, float_model, batches, set(keep or ()), not act_bits_fixed)
    start = {lay.name: lay.w_bits for lay in ev.layers} | {lay.name: cands[0] for lay in ev.search}
    kind, value = _resolve_budget(ev, budget, start, start | {lay.name: cands[-1] for lay in ev.search})
    try:
        noise = _measure_sensitivity(ev, start, cands, log)
        path = _greedy_path(ev, kind, start, noise, cands)
        first = next(c for c in path if ev.total(kind, c) <= value)
        chosen = _refill(ev, kind, first, noise, cands, value)
        pareto = _pareto(ev, path, chosen, noise, measure_points, log)
        ev.apply(chosen)
    except BaseException:  # interrupted or failed: leave the model as it was given
        ev.apply({lay.name: lay.w_bits for lay in ev.layers})
        raise
    to_cost = {"mse": lambda n: n, "sqnr": lambda n: -_db(ev.power, n)}[kind_metric]
    return MixedPrecisionResult(
        bits={lay.name: (chosen[lay.name], ev.a_bits(lay, chosen[lay.name])) for lay in ev.layers},
        sensitivity={n: {b: to_cost(v) for b, v in d.items()} for n, d in noise.items()},
        budget=value, budget_kind=kind, achieved=ev.total(kind, chosen),
        pareto=pareto, sqnr_db=next(p["sqnr_db"] for p in pareto if p["chosen"]),
        params={lay.name: lay.params for lay in ev.layers}, macs={lay.name: lay.macs for lay in ev.layers},
        candidates=tuple(cands), metric=kind_metric)


__all__ = ["BOPS_UNITS", "KINDS", "METRICS", "MixedPrecisionResult", "SIZE_UNITS", "apply_bits", "logit_sqnr_db",
           "parse_budget", "sensitivity_search"]

"""The size/BOPs vs logit-SQNR curve of a mixed-precision search, and its per-layer bits table.

Both take a :class:`qcnn.methods.mixed_precision.MixedPrecisionResult` duck-typed (any object or mapping
with ``pareto``, ``bits``, ``sensitivity`` and optionally ``params``, ``budget``, ``budget_kind``) or, for
the plot, the list of Pareto points itself: this layer does not import :mod:`qcnn.methods`.

The plot draws the predicted SQNR of every point of the greedy path (small markers joined by a thin line),
the measured SQNR of the points that were evaluated (large markers), the chosen configuration (a star)
and the budget (a dashed vertical line when it is of the plotted kind).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from qcnn.io import write_with

#: x-axis choices: point key, scale to the plotted unit, axis label
X_AXES = {"size": ("size", 1 / 1024, "weight size (KiB)"), "bops": ("bops", 1e-9, "BOPs (G)")}
Y_LABEL = "logit SQNR vs float (dB)"


def _get(obj, key: str, default=None):
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _points(result) -> list[dict]:
    points = result if isinstance(result, list) else _get(result, "pareto")
    if not points:
        raise ValueError("nothing to plot: the result has no Pareto points")
    return list(points)


def _series(points: list[dict], key: str, scale: float, y: str, where) -> tuple[list[float], list[float]]:
    sel = [p for p in points if where(p) and p.get(y) is not None and math.isfinite(p[y])]
    return [p[key] * scale for p in sel], [p[y] for p in sel]


def _draw(ax, points: list[dict], key: str, scale: float) -> None:
    path = sorted((p for p in points if p.get("on_path", True)), key=lambda p: p[key])
    xs, ys = _series(path, key, scale, "predicted_sqnr_db", lambda p: True)
    if xs:
        ax.plot(xs, ys, "o-", ms=3, lw=0.8, color="tab:gray", alpha=0.8, label="predicted (additive noise)")
    xs, ys = _series(points, key, scale, "sqnr_db", lambda p: True)
    if xs:
        ax.plot(xs, ys, "o", ms=7, color="tab:blue", label="measured")
    xs, ys = _series(points, key, scale, "sqnr_db", lambda p: p.get("chosen"))
    if xs:
        ax.plot(xs, ys, "*", ms=16, color="tab:red", markeredgecolor="k", label="chosen")


def plot_pareto(result, path: str | Path, title: str, x: str = "size") -> Path:
    """Write the Pareto curve of ``result`` (a search result or its list of points) as a PNG at ``path``,
    atomically (:func:`qcnn.io.write_with`); ``x`` is ``"size"`` (KiB) or ``"bops"`` (G). Returns the path."""
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; choose one of {sorted(X_AXES)}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = _points(result)
    key, scale, xlabel = X_AXES[x]
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _draw(ax, points, key, scale)
    budget = None if isinstance(result, list) else _get(result, "budget")
    if budget is not None and _get(result, "budget_kind") == key:
        ax.axvline(budget * scale, ls="--", color="tab:green", lw=1, label="budget")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(Y_LABEL)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def bits_table_md(result) -> str:
    """Markdown table: layer | w bits | a bits | params | sensitivity at each candidate (``-`` for layers
    the search kept as they were)."""
    bits, sens = _get(result, "bits") or {}, _get(result, "sensitivity") or {}
    params = _get(result, "params") or {}
    cands = list(_get(result, "candidates") or sorted({b for d in sens.values() for b in d}, reverse=True))
    unit = {"mse": "logit MSE", "sqnr": "-SQNR dB"}.get(_get(result, "metric"), "cost")
    head = ["layer", "w bits", "a bits", "params", *(f"{unit} @ w{b}" for b in cands)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, (wb, ab) in bits.items():
        cells = [name, _fmt(wb), _fmt(ab), _fmt(params.get(name))]
        cells += [_fmt(sens.get(name, {}).get(b)) for b in cands]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["X_AXES", "Y_LABEL", "bits_table_md", "plot_pareto"]

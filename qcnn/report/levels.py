"""Level-set report of the non-uniform (k-quantile) quantizers of a model: a Markdown table and a figure.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qcnn.io import write_text
from qcnn.quant.nonuniform import QuantileWeightQuantizer, _QuantileBase


def level_sets(model: nn.Module) -> list[dict]:
    """Level set of every quantile quantizer of ``model``: name, kind, bits, levels, int_levels, scale, and
    the largest error of the integer representation relative to the largest level (0 when ``snap``)."""
    rows = []
    for name, q in model.named_modules():
        if not isinstance(q, _QuantileBase):
            continue
        g = q.grid()
        exact = g.levels.float()
        rows.append({
            "name": name,
            "kind": "weight" if isinstance(q, QuantileWeightQuantizer) else "activation",
            "bits": q.bits,
            "signed": q.signed,
            "levels": [round(float(v), 5) for v in exact],
            "int_levels": [int(v) for v in g.int_levels],
            "scale": float(g.scale),
        })
    return rows


def level_report(model: nn.Module, out_dir: str | Path, title: str = "k-quantile level sets") -> tuple[Path, Path]:
    """Write ``levels.md`` (Markdown table) and ``levels.png`` (one row of level markers per quantizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = level_sets(model)
    if not rows:
        raise ValueError("the model has no non-uniform (quantile) quantizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| quantizer | kind | bits | scale | integer levels | levels |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ints = ", ".join(str(v) for v in r["int_levels"])
        lv = ", ".join(f"{v:.4g}" for v in r["levels"])
        lines.append(f"| {r['name']} | {r['kind']} | {r['bits']} | {r['scale']:.4g} | {ints} | {lv} |")
    md = out / "levels.md"
    write_text(md, "\n".join(lines) + "\n")
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.55 * len(rows) + 1.2), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        lv = r["levels"]
        ax.vlines(lv, 0, 1, color="C0" if r["kind"] == "weight" else "C1")
        ax.set_yticks([])
        ax.set_ylabel(r["name"].replace("weight_quant", "W").replace("input_quant", "A"), rotation=0,
                      ha="right", va="center", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    png = out / "levels.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return md, png


__all__ = ["level_report", "level_sets"]

"""``qcnn report DIR``: per-layer table, totals and level histograms of a quantized model.

``DIR`` is a run directory holding ``model.pt`` (written by ``qcnn ptq``, ``qcnn qat`` or ``qcnn bench``)
or the checkpoint file itself. The report is written to ``DIR/report/`` (or ``--out``): ``report.md``,
``report.json`` and one ``hist_<layer>.png`` per quantized layer (weights and input activations with the
quantization levels drawn over them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qcnn.io import write_text


def add_parser(sub) -> None:
    from qcnn.commands.common import add_data_args, positive_int

    p = sub.add_parser("report", help="per-layer table (bits, scale, SQNR, bytes, BOPs) and histograms")
    p.add_argument("run", help="run directory with model.pt, or a qcnn checkpoint file")
    add_data_args(p, dataset_required=True)
    p.add_argument("--images", type=positive_int, default=256, help="calibration images used for activation statistics")
    p.add_argument("--out", default=None, help="output directory (default: RUN/report)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=run)


@torch.no_grad()
def build_report(model, x: torch.Tensor) -> dict:
    """Per-layer rows of :func:`qcnn.report.layers.layer_table` with MACs and BOPs, plus model totals."""
    from qcnn.report.layers import layer_table
    from qcnn.report.size import layer_costs, summarize

    model.eval()
    costs = {c.name: c for c in layer_costs(model, x)}
    rows = layer_table(model, x)
    for r in rows:
        c = costs[r["name"]]
        r["macs"], r["bops"] = c.macs, c.bops
    s = summarize(model, x)
    return {"layers": rows, "totals": {k: s[k] for k in ("size_bytes", "float_size_bytes", "compression",
                                                         "macs", "bops", "float_bops")}}


def to_markdown(rep: dict, title: str, hist_files: list[str]) -> str:
    def f(v):
        return "inf" if v == math.inf else f"{v:.1f}"

    t = rep["totals"]
    lines = [f"# Quantization report: {title}", "",
             f"Model size {t['size_bytes'] / 1024:.1f} KiB (float {t['float_size_bytes'] / 1024:.1f} KiB, "
             f"{t['compression']:.2f}x smaller); {t['macs'] / 1e6:.2f} M MACs per image; "
             f"{t['bops'] / 1e9:.3f} G bit-operations (float {t['float_bops'] / 1e9:.1f} G).", "",
             "| layer | kind | W bits | A bits | weight grid | act grid | W SQNR dB | A SQNR dB | params | "
             "packed bytes | MACs | BOPs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["layers"]:
        lines.append(f"| {r['name']} | {r['type']} | {r['w_bits']} | {r['a_bits']} | {r['w_grid']} | "
                     f"{r['a_grid']} | {f(r['w_sqnr_db'])} | {f(r['a_sqnr_db'])} | {r['params']} | "
                     f"{r['packed_bytes']:.0f} | {r['macs']} | {r['bops']} |")
    lines += ["", "## Histograms (weights and input activations, quantization levels in red)", ""]
    lines += [f"![{h}]({h})" for h in hist_files]
    return "\n".join(lines) + "\n"


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def run(args) -> int:
    from qcnn.commands.common import finish, load_data_from_args, load_model_from_args
    from qcnn.report.histograms import plot_layer_histograms

    path = Path(args.run)
    ckpt = path / "model.pt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(ckpt)!r} (expected RUN/model.pt or a checkpoint file)")
    out = Path(args.out) if args.out else (ckpt.parent / "report")
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_data_from_args(args, augment=False, calib_size=args.images)  # the statistics' images
    args.checkpoint, args.model, args.width, args.num_classes = str(ckpt), None, 1.0, None
    model, arch = load_model_from_args(args, bundle)
    xs, n = [], 0
    for x, _ in bundle.calib:
        xs.append(x)
        n += x.shape[0]
        if n >= args.images:
            break
    x = torch.cat(xs)[: args.images]
    rep = build_report(model, x)
    hists = plot_layer_histograms(model, x, out)
    rep["arch"] = arch
    write_text(out / "report.json", json.dumps(_json_safe(rep), indent=1, default=str))
    write_text(out / "report.md", to_markdown(rep, f"{arch['name']} ({ckpt})", [h.name for h in hists]))
    print((out / "report.md").read_text().split("## Histograms")[0])
    t = rep["totals"]
    return finish(args, {"size_bytes": t["size_bytes"], "compression": t["compression"], "bops": t["bops"],
                         "layers": len(rep["layers"]), "report": str(out / "report.md")})

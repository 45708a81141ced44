"""Per-layer quantization table: bits, grid, weight / activation SQNR, parameters, packed bytes.

``SQNR = 10 log10( sum x^2 / sum (x - x_q)^2 )`` in dB (``inf`` when the quantization is exact).
The weight SQNR compares a layer's (BN-folded) float weight with its quantized weight; the activation
SQNR compares the activation a layer consumes on a calibration batch with its quantized version (the
layer's input quantizer applied to the very tensor that reaches it in the quantized network).
Packed bytes: ``ceil(numel(W) * b_w / 8)`` plus a 32-bit bias; float layers count 32 bits per value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from qcnn.io import write_text
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Quantizer

FLOAT_BITS = 32


def sqnr_db(x: Tensor, xq: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (``inf`` for an exact match, ``nan`` for an all-zero x)."""
    x, xq = x.detach().double(), xq.detach().double()
    sig = float((x * x).sum())
    noise = float(((x - xq) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


def _grid_text(q: nn.Module | None) -> str:
    if not isinstance(q, Quantizer):
        return "float"
    try:
        g = q.grid()
    except (NotImplementedError, RuntimeError):
        return "?"
    if g.fl is not None:
        fl = g.fl.flatten().tolist()
        return f"fl={fl[0]}" if len(fl) == 1 else f"fl={min(fl)}..{max(fl)}"
    if g.scale is not None:
        s = g.scale.flatten()
        return f"s={float(s[0]):.3g}" if s.numel() == 1 else f"s={float(s.min()):.3g}..{float(s.max()):.3g}"
    return f"{g.levels.numel()} levels" if g.levels is not None else "?"


@torch.no_grad()
def layer_table(qmodel: nn.Module, batch: Tensor) -> list[dict]:
    """One row per QConv2d / QLinear (and float Conv2d / Linear) of ``qmodel`` (see module docstring)."""
    inputs: dict[str, Tensor] = {}
    hooks = []
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in layers:
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0])))
    was_training = qmodel.training
    qmodel.eval()
    try:
        qmodel(batch)
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    rows = []
    for name, m in layers:
        quant = isinstance(m, (QConv2d, QLinear))
        wq = m.weight_quant if quant and isinstance(m.weight_quant, Quantizer) else None
        aq = m.input_quant if quant and isinstance(m.input_quant, Quantizer) else None
        wb = wq.bits if wq is not None else FLOAT_BITS
        ab = aq.bits if aq is not None else FLOAT_BITS
        n = m.weight.numel()
        nb = m.bias.numel() if m.bias is not None else 0
        x = inputs.get(name)
        rows.append({
            "name": name,
            "type": type(m).__name__,
            "w_bits": wb,
            "a_bits": ab,
            "w_grid": _grid_text(wq),
            "a_grid": _grid_text(aq),
            "w_sqnr_db": sqnr_db(m.weight, wq(m.weight)) if wq is not None else math.inf,
            "a_sqnr_db": sqnr_db(x, aq(x)) if (aq is not None and x is not None) else math.inf,
            "params": n + nb,
            "packed_bytes": math.ceil(n * wb / 8) + nb * FLOAT_BITS // 8,
        })
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) and v > 0 else (f"{v:.2f}" if math.isfinite(v) else str(v))
    return str(v)


def to_markdown(rows: list[dict]) -> str:
    head = ["layer", "type", "W bits", "A bits", "W grid", "A grid", "W SQNR dB", "A SQNR dB", "params", "bytes"]
    keys = ["name", "type", "w_bits", "a_bits", "w_grid", "a_grid", "w_sqnr_db", "a_sqnr_db", "params",
            "packed_bytes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    total_p = sum(r["params"] for r in rows)
    total_b = sum(r["packed_bytes"] for r in rows)
    lines.append(f"| **total** | | | | | | | | {total_p} | {total_b} |")
    return "\n".join(lines) + "\n"


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_layer_table(rows: list[dict], out_dir: str | Path, stem: str = "layers") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    write_text(md, to_markdown(rows))
    write_text(js, json.dumps([{k: _json_safe(v) for k, v in r.items()} for r in rows], indent=1) + "\n")
    return md, js


__all__ = ["layer_table", "sqnr_db", "to_markdown", "write_layer_table"]

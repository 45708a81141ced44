"""Per-layer histograms of weights and activations with the quantization levels drawn over them.

For every quantized conv/linear layer the float weight (one output channel for per-channel grids: the
channel with the widest range) and the float activation it consumes (recorded on a calibration batch)
are histogrammed, and the values their quantizer can produce are drawn as vertical lines (all levels up
to 64 of them; beyond that the two ends of the grid), as in the survey's QCode figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from qcnn.nn.layers import QConv2d, QLinear

MAX_LINES = 64


def grid_levels(quantizer: nn.Module, channel: int | None = None) -> Tensor | None:
    """Real values a quantizer's grid can take (for one channel of a per-channel grid)."""
    try:
        g = quantizer.grid()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if g.levels is not None:
        return g.levels.detach().float().flatten().cpu()
    if g.scale is None:
        return None
    scale = g.scale.detach().float().cpu()
    zp = g.zero_point.detach().float().cpu() if g.zero_point is not None else torch.zeros_like(scale)
    if scale.dim() > 0 and scale.numel() > 1:
        c = 0 if channel is None else channel
        scale, zp = scale[c], zp[c]
    codes = torch.arange(g.qmin, g.qmax + 1, dtype=torch.float32)
    return (codes - zp.reshape(())) * scale.reshape(())


@torch.no_grad()
def record_inputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Float inputs of every quantized layer (before its input quantizer) on the batch ``x``."""
    acts: dict[str, Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name: acts.__setitem__(name, inp[0].detach().float().cpu())))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return acts


def _widest_channel(w: Tensor) -> int:
    flat = w.detach().reshape(w.shape[0], -1)
    return int((flat.amax(1) - flat.amin(1)).argmax())


def plot_layer_histograms(model: nn.Module, x: Tensor, out_dir: str | Path, max_layers: int = 64) -> list[Path]:
    """Write one PNG per quantized layer (weights left, activations right); return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    acts = record_inputs(model, x)
    paths = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (QConv2d, QLinear))][:max_layers]
    for name, m in layers:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        w = m.weight.detach().float().cpu()
        per_channel = m.weight_quant is not None and getattr(m.weight_quant, "per_channel", False)
        ch = _widest_channel(w) if per_channel else None
        wv = w[ch].flatten() if ch is not None else w.flatten()
        _hist(axes[0], wv, grid_levels(m.weight_quant, ch) if m.weight_quant is not None else None,
              f"{name} weights" + (f" (channel {ch})" if ch is not None else ""))
        a = acts.get(name)
        if a is not None:
            _hist(axes[1], a.flatten(), grid_levels(m.input_quant) if m.input_quant is not None else None,
                  f"{name} input activations")
        fig.tight_layout()
        p = out_dir / f"hist_{name.replace('.', '_') or 'layer'}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def _hist(ax, v: Tensor, levels: Tensor | None, title: str) -> None:
    v = v[torch.isfinite(v)]
    if v.numel() > 200_000:
        v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    ax.hist(v.numpy(), bins=min(200, max(10, int(math.sqrt(v.numel())))), color="tab:blue", alpha=0.75)
    if levels is not None and levels.numel():
        lo, hi = float(v.min()), float(v.max())
        span = hi - lo or 1.0
        shown = levels if levels.numel() <= MAX_LINES else levels[[0, -1]]
        for lv in shown.tolist():
            if lo - 0.25 * span <= lv <= hi + 0.25 * span:
                ax.axvline(lv, color="tab:red", lw=0.7, alpha=0.8)
        ax.set_title(f"{title}: {levels.numel()} levels", fontsize=9)
    else:
        ax.set_title(f"{title} (float)", fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("value (real units; red: quantization levels)" if levels is not None and levels.numel()
                  else "value (real units)", fontsize=8)
    ax.set_ylabel("count (log scale)", fontsize=8)

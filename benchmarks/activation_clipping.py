"""How much of each layer's input a quantized checkpoint clips: the fraction above the top of its grid.

For every quantized conv/linear whose input quantizer describes a uniform grid, one forward pass over the
first ``--images`` test images records the fraction of the layer's input above the grid's top value
``scale * (q_max - zero_point)`` (those values all land on the top level and, under a clipped
straight-through estimator, get no gradient), the 99th percentile and the maximum. The same fractions of
the float model (``--float``, a plain checkpoint of the same architecture) show what the network carried
before quantization. Writes ``<out>/activation_clipping.{json,md}``.

    python benchmarks/activation_clipping.py --checkpoint runs/i13/dorefa_w2a2/model.pt \\
        --float ../shared/data/weights/resnet20-12fca82f.th --data-dir ../shared/data/cifar10-jpeg.zip --out runs/i13
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clipping(qmodel: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """Per quantized layer: fraction of its input above its input grid's top, p99 and max of the input."""
    from qcnn.transform import quantized_layers

    rows, hooks = [], []
    for name, layer in quantized_layers(qmodel):
        q = layer.input_quant
        if q is None:
            continue
        try:
            g = q.grid()
        except (NotImplementedError, RuntimeError):
            continue
        if not g.is_uniform or g.scale.dim() > 0 and g.scale.numel() > 1:
            continue
        zp = float(g.zero_point) if g.zero_point is not None else 0.0
        top = float(g.scale) * (g.qmax - zp)

        def hook(mod, inp, name=name, top=top):
            v = inp[0].detach().float().flatten()
            sample = v[torch.randperm(v.numel())[: 1 << 20]] if v.numel() > 1 << 20 else v
            rows.append({"layer": name, "top": round(top, 4), "above_top": float((v > top).float().mean()),
                         "p99": float(sample.quantile(0.99)), "max": float(v.max())})

        hooks.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            qmodel.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


def float_above(model: torch.nn.Module, x: torch.Tensor, layers: list[str], tops: list[float]) -> list[float]:
    """Fraction of the float model's input to each named layer above the same top value."""
    out, hooks = {}, []
    mods = dict(model.named_modules())
    for name, top in zip(layers, tops):
        if name in mods:
            hooks.append(mods[name].register_forward_pre_hook(
                lambda m, inp, name=name, top=top: out.__setitem__(name, float((inp[0] > top).float().mean()))))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [out.get(n) for n in layers]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="quantized model.pt")
    p.add_argument("--float", dest="float_ckpt", default=None, help="float checkpoint of the same architecture")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()

    from qcnn.checkpoint import load_model
    from qcnn.data import get_data
    from qcnn.models import build_model, load_weights

    qmodel, info = load_model(args.checkpoint)
    ds = info.get("metrics", {}).get("dataset") or "cifar10"
    b = get_data(ds, data_dir=args.data_dir, batch_size=args.images, augment=False, calib_size=0)
    x = next(iter(b.test))[0][: args.images]
    rows = clipping(qmodel, x)
    if args.float_ckpt:
        arch = info["arch"]
        fm = load_weights(build_model(arch["name"], num_classes=arch["num_classes"],
                                      in_channels=arch["in_channels"], width=arch.get("width", 1.0)),
                          args.float_ckpt)
        for r, f in zip(rows, float_above(fm, x, [r["layer"] for r in rows], [r["top"] for r in rows])):
            r["float_above_top"] = f
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"checkpoint": args.checkpoint, "float": args.float_ckpt, "images": len(x), "layers": rows}
    (out / "activation_clipping.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [f"# Inputs above the grid top: `{args.checkpoint}` ({len(x)} test images)", "",
             "| layer | grid top | above top | float above top | p99 | max |", "|---|---|---|---|---|---|"]
    for r in rows:
        fa = r.get("float_above_top")
        lines.append(f"| {r['layer']} | {r['top']:.3f} | {100 * r['above_top']:.1f} % | "
                     f"{'' if fa is None else f'{100 * fa:.1f} %'} | {r['p99']:.2f} | {r['max']:.2f} |")
    (out / "activation_clipping.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

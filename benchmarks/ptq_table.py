"""Post-training quantization table for a CIFAR ResNet: W/A bits x range estimator x grid family.

Rows: W/A = 8/8, 6/6, 5/5, 4/8, 4/4. Columns: calibration (minmax, percentile, mse, kl_tensorrt, kl) for
(a) per-tensor power-of-two QCode (``qcode``) and (b) per-channel free-scale uniform weights with
uniform activations (``uniform --per-channel``). All layers are quantized, first and last included
(``first_last=same``); BN folded; residual adds keep 8 bits. Calibration on the held-out calibration split
(last training images). Observer statistics do not depend on the bit width, so each (family, estimator)
pair is calibrated once and re-gridded for each W/A row (identical to a fresh ``qcnn ptq`` run).
A last row runs the accuracy-aware search (QCode, ``--max-drop``).

    python benchmarks/ptq_table.py --test-images 2000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from qcnn.data import get_data, subset
from qcnn.methods import quantize
from qcnn.methods.ptq import (
    _act_quantizers,
    _batches,
    calibrate_with_histograms,
    post_training_quantize,
    top1,
)
from qcnn.methods.regrid import set_bits
from qcnn.models import build_model, load_weights
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.recipes import Recipe
from qcnn.report.size import summarize

BITS = ((8, 8), (6, 6), (5, 5), (4, 8), (4, 4))
CALIBS = ("minmax", "percentile", "mse", "kl_tensorrt", "kl")
FAMILIES = {"qcode": dict(method="qcode", per_channel=False), "uniform-pc": dict(method="uniform", per_channel=True)}


def regrid(qmodel, w_bits: int, a_bits: int) -> None:
    """Set every layer's weight / input quantizer to new bits and recompute its grid from the observers."""
    for _, m in qmodel.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            set_bits(m.weight_quant, w_bits, None, None, "mse", 0)
            set_bits(m.input_quant, a_bits, None, None, "mse", 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--weights", default="../shared/data/weights/resnet20-12fca82f.th")
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.zip")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--calib-images", type=int, default=1000)
    p.add_argument("--eval-images", type=int, default=1000, help="calibration-split images of the search")
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--calibs", default=",".join(CALIBS))
    p.add_argument("--families", default=",".join(FAMILIES), help="grid families to run (qcode, uniform-pc)")
    p.add_argument("--no-search", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--from-log", default=None,
                   help="only render the JSON/Markdown from the cell lines a previous (possibly cut-short) run "
                        "printed; --test-images/--calib-images must match that run")
    p.add_argument("--float-top1", type=float, default=None, help="with --from-log: the float top-1 it printed")
    args = p.parse_args(argv)
    if args.from_log:
        lines = Path(args.from_log).read_text().splitlines()
        cells = [json.loads(line) for line in lines if line.startswith("{")]
        floats = [float(line.split()[2]) for line in lines if line.startswith("float top1")]
        if args.float_top1 is None and floats:
            args.float_top1 = floats[0]
        cells = [c for c in cells if "family" in c]
        write(args, {"model": args.model, "weights": args.weights, "dataset": "cifar10-jpeg",
                     "test_images": args.test_images, "calib_images": args.calib_images,
                     "float_top1": args.float_top1, "cells": cells, "search": None, "seconds": None,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": "CPU, 2 threads",
                     "note": f"rendered from the log of a run cut short ({len(cells)} cells)"})
        return 0
    torch.manual_seed(0)
    t0 = time.time()
    bundle = get_data("cifar10", data_dir=args.data_dir, batch_size=250, augment=False,
                      calib_size=max(args.calib_images, args.eval_images))
    test = list(subset(bundle.test, args.test_images))
    model = load_weights(build_model(args.model), args.weights).eval()
    float_top1 = top1(model, test)
    print(f"float top1 {float_top1:.2f} on {args.test_images} test images", flush=True)
    calib_batches = _batches(bundle.calib, args.calib_images)
    cells = []
    for fam in args.families.split(","):
        kw = FAMILIES[fam]
        for calib in args.calibs.split(","):
            recipe = Recipe(**kw, calib=calib, first_last="same", fold_bn=True, calib_images=args.calib_images)
            qmodel = quantize(model, recipe).eval()
            tc = time.time()
            calibrate_with_histograms(qmodel, calib_batches, record=False)
            tc = time.time() - tc
            for wb, ab in BITS:
                regrid(qmodel, wb, ab)
                acc = top1(qmodel, test)
                cells.append({"family": fam, "calib": calib, "w_bits": wb, "a_bits": ab, "top1": acc,
                              "drop": float_top1 - acc, "calib_seconds": round(tc, 1)})
                print(json.dumps(cells[-1]), flush=True)
            del qmodel
    search = None
    if not args.no_search:
        ts = time.time()
        recipe = Recipe(method="qcode", per_channel=False, calib="minmax", first_last="same", fold_bn=True,
                        calib_images=args.calib_images)
        res = post_training_quantize(model, recipe, bundle.calib, search="accuracy", max_drop=args.max_drop,
                                     eval_images=args.eval_images, log=print)
        size = summarize(res.model, test[0][0][:1])
        fsize = summarize(model, test[0][0][:1])
        acc = top1(res.model, test)
        layers = [{"layer": n, "w_bits": m.weight_quant.bits, "a_bits": m.input_quant.bits}
                  for n, m in res.model.named_modules() if isinstance(m, (QConv2d, QLinear))]
        search = {"max_drop": args.max_drop, "calib_float_top1": res.float_calib_top1,
                  "calib_top1": res.calib_top1, "top1": acc, "drop": float_top1 - acc,
                  "weight_bits": sum(r["params"] * r["w_bits"] for r in size["layers"]),
                  "weight_bits_8bit": sum(r["params"] * 8 for r in size["layers"]),
                  "bops": size["bops"], "bops_8bit": sum(r["macs"] * 64 for r in fsize["layers"]),
                  "layers": layers, "seconds": round(time.time() - ts, 1),
                  "adds": {n: q.bits for n, q in _act_quantizers(res.model) if n.startswith("qadd")}}
        print(json.dumps({k: v for k, v in search.items() if k != "layers"}), flush=True)
    result = {"model": args.model, "weights": args.weights, "dataset": "cifar10-jpeg", "test_images": args.test_images,
              "calib_images": args.calib_images, "float_top1": float_top1, "cells": cells, "search": search,
              "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"CPU, {torch.get_num_threads()} threads"}
    write(args, result)
    return 0


def write(args, result: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ptq_table.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "ptq_table.md").write_text(to_markdown(result))
    print(to_markdown(result))


def to_markdown(r: dict) -> str:
    calibs = list(dict.fromkeys(c["calib"] for c in r["cells"]))
    fams = list(dict.fromkeys(c["family"] for c in r["cells"]))
    head = ["W/A"] + [f"{f} {c}" for f in fams for c in calibs]
    lines = [f"# PTQ table: {r['model']} on {r['dataset']} (first {r['test_images']} test images)", "",
             f"Float top-1: {r['float_top1']:.2f}. All layers quantized (first/last included), BN folded, "
             f"{r['calib_images']} calibration images; {r['date']}, {r['machine']}. {r.get('note', '')}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wb, ab in BITS:
        row = [f"{wb}/{ab}"]
        for f in fams:
            for c in calibs:
                hit = [x for x in r["cells"] if x["family"] == f and x["calib"] == c and (x["w_bits"], x["a_bits"]) ==
                       (wb, ab)]
                row.append(f"{hit[0]['top1']:.2f}" if hit else "")
        lines.append("| " + " | ".join(row) + " |")
    s = r.get("search")
    if s:
        lines += ["", f"Accuracy-aware search (QCode, minmax, max_drop {s['max_drop']}): top-1 {s['top1']:.2f} "
                      f"(drop {s['drop']:.2f}; on the calibration split {s['calib_top1']:.2f} vs float "
                      f"{s['calib_float_top1']:.2f}), weight bits {s['weight_bits']} vs {s['weight_bits_8bit']} at "
                      f"8 bit, BOPs {s['bops']:.3g} vs {s['bops_8bit']:.3g}.", "",
                  "| layer | W bits | A bits |", "|---|---|---|"]
        lines += [f"| {x['layer']} | {x['w_bits']} | {x['a_bits']} |" for x in s["layers"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

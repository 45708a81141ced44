"""Quantized detector: integer engine and ONNX Runtime against the fake-quant model, raw head tensors and mAP.

For each quantized zoo detector checkpoint (e.g. the W4A4 / W8A8 cells of ``qcnn bench --suite detection``, with
``yolo_tiny``, or ``--suite detection-ssd``, with ``ssdlite``):

* ``codes``: every quantizer's codes (layer inputs, lookup-table activations) of the integer engine on the
  test canvases against the fake-quant simulation evaluated in float64
  (:func:`qcnn.integer.agreement.simulation_codes`): fraction equal and max |difference| in LSB;
* ``head``: the raw head tensors (yolo_tiny: one ``[N, 15, 12, 12]``; ssdlite: the 12 per-level class and box
  maps) of the engine against that simulation (max |difference| over all of them, float rounding of the
  dequantized accumulator only) and ONNX Runtime on the integer ONNX form against the engine (``torch.equal``);
* ``map``: COCO mAP@0.5 / mAP@[.5:.95] (points) of the fake-quant model (float32, as trained), the engine and
  ONNX Runtime, each followed by the same float decoding and NMS (the model's task: :mod:`qcnn.detection.yolo`,
  :mod:`qcnn.detection.ssd`).

    python benchmarks/detection_agreement.py runs/bench_detection/cells/fqn@4-4/model.pt ...

Writes ``benchmarks/results/detection_agreement.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qcnn.checkpoint import load_model  # noqa: E402
from qcnn.data.detection_loaders import detection_bundle  # noqa: E402
from qcnn.detection.task import task_of  # noqa: E402
from qcnn.integer import to_integer  # noqa: E402
from qcnn.integer.agreement import compare_codes, simulation_codes  # noqa: E402
from qcnn.integer.onnx_export import to_onnx  # noqa: E402
from qcnn.integer.onnx_runtime import OrtModel  # noqa: E402
from qcnn.io import write_text  # noqa: E402


def _tensors(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


@torch.no_grad()
def check(path: str, bundle, threads: int) -> dict:
    model, info = load_model(path)
    model.eval()
    task = task_of(model)
    if task is None:
        raise ValueError(f"{path}: not a zoo detector ({info['arch']['name']})")
    batches = list(bundle.test)
    t0 = time.time()
    im = to_integer(model, batches[0][0][:1])
    ort = OrtModel(to_onnx(im, form="integer"), threads=threads)
    equal = elements = 0
    max_code, head_diff, head_scale, ort_equal = 0, 0.0, 0.0, True
    outs = {"fakequant": [], "integer": [], "onnxruntime-integer": []}
    for x, _ in batches:
        ref64, sim64 = simulation_codes(model, x, dtype=torch.float64)
        out, codes = im.run(x, record=True)
        cmp = compare_codes(codes, sim64)
        equal += cmp["equal"] * cmp["elements"]
        elements += cmp["elements"]
        max_code = max(max_code, cmp["max_diff"])
        o = ort(x)
        out_l, ref_l, o_l = _tensors(out), _tensors(ref64), _tensors(o)
        head_diff = max(head_diff, *(float((a.double() - r).abs().max()) for a, r in zip(out_l, ref_l)))
        head_scale = max(head_scale, *(float(r.abs().max()) for r in ref_l))
        ort_equal &= len(o_l) == len(out_l) and all(torch.equal(a, b.float()) for a, b in zip(o_l, out_l))
        outs["fakequant"].append(model(x))
        outs["integer"].append(task.as_output(out))
        outs["onnxruntime-integer"].append(task.as_output(o))
    maps = {}
    for kind, heads in outs.items():
        it = iter(heads)
        res = task.evaluate(lambda _x, it=it: next(it), batches)
        maps[kind] = {"map_50": round(res["map_50"], 2), "map": round(res["map"], 2)}
    recipe = info.get("recipe") or {}
    bits = f"W{recipe.get('w_bits')}A{recipe.get('a_bits')}"
    return {"checkpoint": path, "model": info["arch"]["name"], "method": recipe.get("method"), "bits": bits,
            "images": sum(len(t) for _, t in batches), "points": len(sim64),
            "codes_equal": equal / max(elements, 1), "codes_max_diff": max_code, "codes_elements": elements,
            "head_max_abs_diff_vs_float64_sim": head_diff, "head_max_abs": head_scale,
            "ort_integer_equals_engine": ort_equal, "map": maps, "seconds": round(time.time() - t0, 1)}


def table(rows: list[dict]) -> str:
    lines = ["# Quantized detectors: integer engine and ONNX Runtime vs the fake-quant model", "",
             "Codes: every quantizer point of the engine vs the float64 simulation (fraction equal, max LSB). "
             "Head: the raw head tensors, engine vs float64 simulation (max |diff| against max |value|); ORT = "
             "ONNX Runtime on the integer ONNX form, equal to the engine element for element. mAP (points) after "
             "the same float decoding and NMS.", "",
             "| cell | images | codes equal | max LSB | head max diff / max | ORT == engine | "
             "mAP@0.5 fake-quant / engine / ORT | mAP fake-quant / engine / ORT |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["map"]
        lines.append(
            f"| {r.get('model', 'yolo_tiny')} {r['method']} {r['bits']} | {r['images']} | {r['codes_equal']:.6f} | "
            f"{r['codes_max_diff']} | "
            f"{r['head_max_abs_diff_vs_float64_sim']:.2e} / {r['head_max_abs']:.2f} | "
            f"{r['ort_integer_equals_engine']} | "
            + " | ".join(" / ".join(f"{m[k][f]:.2f}" for k in ("fakequant", "integer", "onnxruntime-integer"))
                         for f in ("map_50", "map")) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="quantized detector model.pt files (yolo_tiny, ssdlite)")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "detection_agreement"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = detection_bundle(batch_size=a.batch, augment=False, calib_size=0, test_limit=a.test_images)
    rows = []
    for path in a.checkpoints:
        rows.append(check(path, bundle, a.threads))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out.with_suffix(".json"), json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    write_text(out.with_suffix(".md"), table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

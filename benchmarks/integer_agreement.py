"""Integer engine and ONNX Runtime vs the fake-quant simulation, in integer codes and top-1.

For each model the quantized network (fake-quant simulation, eval mode) defines the expected codes of
every quantizer (layer inputs, residual sums). Reported per model:

* ``per_layer``: codes of each layer computed by the engine (resp. ONNX Runtime) from exactly the
  simulation's input codes (teacher forcing): fraction equal and max |difference| in LSB;
* ``end_to_end``: the same with the engine running on its own codes (differences spread with depth);
* ``top1``: simulation, integer engine and ONNX Runtime on the test images (``prediction_agreement`` for
  MobileNetV2, whose sample inputs carry no test-set labels).

Models: ResNet-20 (CIFAR-10 JPEG, pretrained ``resnet20-12fca82f.th``, uniform W8A8 PTQ with BN folded,
plus any ``--fqn`` checkpoints made by ``qcnn qat --recipe recipes/fqn.yaml``), LeNet-5 (Fashion-MNIST,
``--lenet`` float checkpoint, uniform W8A8 PTQ), torchvision MobileNetV2 (ImageNet weights, W8A8 PTQ,
sample JPEGs from ``.data/imagenet_samples`` or random normal inputs). Writes
``benchmarks/results/integer_agreement.{json,md}``.

    python benchmarks/integer_agreement.py --test-images 2000 --fqn runs/fqn_w4a4/model.pt runs/fqn_w8a8/model.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PTQ = {"method": "uniform", "w_bits": 8, "a_bits": 8, "first_last": "8bit", "fold_bn": True, "per_channel": True}


def _calibrate(q, batches):
    from qcnn.calib import calibrating

    q.eval()
    with torch.no_grad(), calibrating(q):
        for x in batches:
            q(x)
    return q


def _ort_forced(im, x, sim):
    from qcnn.integer.onnx_export import OrtModel, to_onnx

    model, names = to_onnx(im, with_codes=True, forced=True)
    ort = OrtModel(model)
    feeds = {"input": x.numpy()}
    for i in ort.session.get_inputs():
        if i.name.startswith("force:"):
            feeds[i.name] = sim[i.name[6:]].numpy().astype(np.uint8 if "uint8" in i.type else np.int8)
    outs = ort.session.run(None, feeds)
    return {p: torch.from_numpy(outs[ort.output_names.index(n)].astype(np.int64))
            for p, n in names.items() if n in ort.output_names}


def _merge(acc, cmp):
    if acc is None:
        return dict(cmp, _eq=cmp["equal"] * cmp["elements"])
    acc["_eq"] += cmp["equal"] * cmp["elements"]
    acc["elements"] += cmp["elements"]
    acc["max_diff"] = max(acc["max_diff"], cmp["max_diff"])
    if cmp["worst_equal"] < acc["worst_equal"]:
        acc["worst_equal"], acc["worst_point"] = cmp["worst_equal"], cmp["worst_point"]
    return acc


def _final(acc):
    acc = dict(acc)
    acc["equal"] = acc.pop("_eq") / max(acc["elements"], 1)
    return acc


@torch.no_grad()
def measure(name: str, q, batches, labelled: bool, ort_batches: int = 1) -> dict:
    """Agreement figures of quantized model ``q`` over ``batches`` of (x, y) (y may be None)."""
    from qcnn.integer import to_integer
    from qcnn.integer.agreement import compare_codes, simulation_codes
    from qcnn.integer.onnx_export import OrtModel, to_onnx

    t0 = time.time()
    x0 = batches[0][0]
    im = to_integer(q, x0)
    ort = OrtModel(to_onnx(im))
    per_layer = e2e = ort_layer = None
    n = sim_ok = int_ok = ort_ok = agree_int = agree_ort = 0
    for i, (x, y) in enumerate(batches):
        ref, sim = simulation_codes(q, x)
        out, codes = im.run(x, record=True)
        _, forced = im.run(x, force=sim, record=True)
        per_layer = _merge(per_layer, compare_codes(forced, sim))
        e2e = _merge(e2e, compare_codes(codes, sim))
        if i < ort_batches:
            ort_layer = _merge(ort_layer, compare_codes(_ort_forced(im, x, sim), sim))
        o = ort(x)
        p_sim, p_int, p_ort = ref.argmax(1), out.argmax(1), o.argmax(1)
        agree_int += int((p_int == p_sim).sum())
        agree_ort += int((p_ort == p_sim).sum())
        if labelled:
            sim_ok += int((p_sim == y).sum())
            int_ok += int((p_int == y).sum())
            ort_ok += int((p_ort == y).sum())
        n += x.shape[0]
    res = {"model": name, "images": n, "integer_ops": len(im.ops), "quantizer_points": len(im.points),
           "engine_per_layer": _final(per_layer), "engine_end_to_end": _final(e2e),
           "ort_per_layer": _final(ort_layer), "prediction_agreement_engine": agree_int / n,
           "prediction_agreement_ort": agree_ort / n, "seconds": round(time.time() - t0, 1)}
    if labelled:
        res.update(top1_fakequant=100 * sim_ok / n, top1_integer=100 * int_ok / n, top1_ort=100 * ort_ok / n)
    print(json.dumps(res), flush=True)
    return res


def _batches(loader, limit):
    out, seen = [], 0
    for x, y in loader:
        out.append((x.cpu(), y.cpu()))
        seen += x.shape[0]
        if seen >= limit:
            break
    return out


def resnet20(args) -> list[dict]:
    from qcnn.checkpoint import load_model
    from qcnn.data import get_data
    from qcnn.models import build_model
    from qcnn.transform import quantize

    b = get_data("cifar10", args.cifar, batch_size=128, augment=False, calib_size=1000)
    test = _batches(b.test, args.test_images)
    calib = [x for x, _ in _batches(b.calib, 512)]
    model = build_model("resnet20", weights=str(SHARED / "weights" / "resnet20-12fca82f.th")).eval()
    with torch.no_grad():
        float_top1 = 100 * sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / sum(len(y) for _, y in test)
    out = []
    if not args.no_ptq:
        q = _calibrate(quantize(model, PTQ), calib)
        r = measure("resnet20 uniform W8A8 PTQ (cifar10-jpeg)", q, test, True)
        r["float_top1"] = float_top1
        out.append(r)
    for ck in args.fqn:
        if Path(ck).exists():
            q, info = load_model(ck)
            r = measure(f"resnet20 FQN W{info['recipe']['w_bits']}A{info['recipe']['a_bits']} ({ck})", q, test, True)
            r["float_top1"] = float_top1
            out.append(r)
    return out


def lenet(args) -> list[dict]:
    from qcnn.checkpoint import load_model
    from qcnn.data import get_data
    from qcnn.transform import quantize

    b = get_data("fashion-mnist", None, batch_size=256, augment=False, calib_size=1000)
    test = _batches(b.test, args.test_images)
    if not Path(args.lenet).exists():
        print(f"skipping LeNet-5: {args.lenet} not found")
        return []
    model, _ = load_model(args.lenet)
    with torch.no_grad():
        float_top1 = 100 * sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / sum(len(y) for _, y in test)
    q = _calibrate(quantize(model, PTQ), [x for x, _ in _batches(b.calib, 1000)])
    r = measure("lenet5 uniform W8A8 PTQ (fashion-mnist)", q, test, True, ort_batches=2)
    r["float_top1"] = float_top1
    return [r]


def mobilenet(args) -> list[dict]:
    import torchvision

    from qcnn.transform import quantize

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(SHARED / "weights" / "mobilenet_v2-b0353104.pth", weights_only=True))
    model.eval()
    samples = sorted((ROOT / ".data" / "imagenet_samples").glob("*.jpg"))
    if samples:
        from torchvision.io import decode_jpeg, read_file
        from torchvision.transforms.functional import center_crop, normalize, resize

        imgs = []
        for f in samples[: args.mnv2_images]:
            t = decode_jpeg(read_file(str(f))).float() / 255
            t = center_crop(resize(t, 256, antialias=True), 224)
            imgs.append(normalize(t, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
        x = torch.stack(imgs)
        source = f"{len(imgs)} ImageNet sample JPEGs"
    else:
        x = torch.randn(args.mnv2_images, 3, 224, 224)
        source = "random normal inputs"
    torch.manual_seed(0)
    calib = torch.cat([x, torch.randn(8, 3, 224, 224)])
    q = _calibrate(quantize(model, PTQ), [calib])
    r = measure(f"mobilenet_v2 uniform W8A8 PTQ ({source})", q, [(x, None)], False)
    return [r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--cifar", default=str(SHARED / "cifar10-jpeg.zip"))
    p.add_argument("--lenet", default=str(ROOT / "runs" / "float_lenet5" / "model.pt"))
    p.add_argument("--fqn", nargs="*", default=[])
    p.add_argument("--mnv2-images", type=int, default=8)
    p.add_argument("--no-ptq", action="store_true", help="ResNet-20: only the --fqn checkpoints")
    p.add_argument("--models", nargs="*", default=["lenet5", "resnet20", "mobilenet_v2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "integer_agreement"))
    p.add_argument("--merge", nargs="*", default=None,
                   help="only combine the results of earlier runs (their .json files) into --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.merge is not None:
        for f in args.merge:
            rows += json.loads(Path(f).read_text())["results"]
        return write(rows, Path(args.out))
    for name, fn in (("lenet5", lenet), ("resnet20", resnet20), ("mobilenet_v2", mobilenet)):
        if name in args.models:
            rows += fn(args)
    return write(rows, Path(args.out))


def write(rows: list[dict], out: Path) -> int:
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "onnxruntime": __import__("onnxruntime").__version__, "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")

    def pct(v):
        return f"{100 * v:.4f} %"

    lines = ["# Integer engine / ONNX Runtime vs fake-quant simulation", "", f"{res['date']}, torch {res['torch']}, "
             f"onnxruntime {res['onnxruntime']}.", "",
             "| model | images | engine per-layer equal (max LSB) | ORT per-layer equal (max LSB) | engine end-to-end "
             "equal (max LSB) | float top-1 | fake-quant top-1 | integer top-1 | ORT top-1 | pred. agreement "
             "engine / ORT |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        el, ol, ee = r["engine_per_layer"], r["ort_per_layer"], r["engine_end_to_end"]
        tops = [f"{r[k]:.2f}" if k in r else "-" for k in ("float_top1", "top1_fakequant", "top1_integer",
                                                             "top1_ort")]
        lines.append(f"| {r['model']} | {r['images']} | {pct(el['equal'])} ({el['max_diff']}) | {pct(ol['equal'])} "
                     f"({ol['max_diff']}) | {pct(ee['equal'])} ({ee['max_diff']}) | " + " | ".join(tops) +
                     f" | {pct(r['prediction_agreement_engine'])} / {pct(r['prediction_agreement_ort'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

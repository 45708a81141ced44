"""Integer engine and ONNX Runtime vs the fake-quant simulation, in integer codes and top-1.

For each model the quantized network (fake-quant simulation, eval mode) defines the expected codes of
every quantizer (layer inputs, residual sums). Reported per model:

* ``per_layer``: codes of each layer computed by the engine (resp. ONNX Runtime) from exactly the
  simulation's input codes (teacher forcing): fraction equal and max |difference| in LSB (first
  ``--layer-batches`` batches);
* ``end_to_end``: the same with the engine (resp. ONNX Runtime) running on its own codes (differences spread
  with depth);
* ``top1``: simulation, integer engine and ONNX Runtime on the test images, and the prediction agreement of
  each engine with the simulation.

The simulations are the deployable ones: uniform W8A8 PTQ, per-channel symmetric weights, BN folded, biases
on the int32 accumulator grid (:func:`qcnn.integer.add_bias_quantizers`; ``--no-bias-quant`` for the plain
float bias). ONNX Runtime runs the QLinear (channels-last, com.microsoft) form where the graph allows it,
else the QDQ form (column ``ORT form``). Models: ResNet-20 (CIFAR-10 JPEG, pretrained ``resnet20-12fca82f.th``;
``ptq``: residual adds on float operands, ``deploy``: the int8 deployment model of
``benchmarks/int8_speed.py``: conv outputs feeding the adds quantized, ReLU'd sums on shared grids), plus any
``--fqn`` checkpoints made by ``qcnn qat --recipe recipes/fqn.yaml``; LeNet-5 (Fashion-MNIST, ``--lenet``
float checkpoint); torchvision MobileNetV2 (ImageNet weights, the sample JPEGs of ``.data/imagenet_samples``,
whose file names end with the ImageNet class index). Writes ``benchmarks/results/integer_agreement.{json,md}``.

    python benchmarks/integer_agreement.py --test-images 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PTQ = {"method": "uniform", "w_bits": 8, "a_bits": 8, "first_last": "8bit", "fold_bn": True, "per_channel": True}


def _ptq(model, calib, bias_quant=True, deploy=False):
    """Calibrated W8A8 PTQ simulation of ``model`` (``deploy``: the int8 deployment variant)."""
    from qcnn.calib import calibrating
    from qcnn.integer import add_bias_quantizers, add_residual_quantizers, share_relu_grids
    from qcnn.transform import quantize

    q = quantize(model, PTQ).eval()
    if deploy:
        add_residual_quantizers(q)
    if bias_quant:
        add_bias_quantizers(q)
    with torch.no_grad(), calibrating(q):
        for x in calib:
            q(x)
    return share_relu_grids(q) if deploy else q


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
def measure(name: str, q, batches, labelled: bool, layer_batches: int = 1, threads: int = 2) -> dict:
    """Agreement figures of quantized model ``q`` over ``batches`` of (x, y) (y may be None)."""
    from qcnn.integer import to_integer
    from qcnn.integer.agreement import compare_codes, simulation_codes
    from qcnn.integer.onnx_export import OrtModel, ort_codes, to_onnx

    t0 = time.time()
    im = to_integer(q, batches[0][0])
    try:
        form, model = "qlinear", to_onnx(im, form="qlinear")
    except ValueError:
        form, model = "qdq", to_onnx(im, form="qdq")
    ort = OrtModel(model, threads=threads)
    forced_model = to_onnx(im, with_codes=True, forced=True, form=form)
    free_model = to_onnx(im, with_codes=True, form=form)
    acc = {k: None for k in ("engine_per_layer", "engine_end_to_end", "ort_per_layer", "ort_end_to_end")}
    n = sim_ok = int_ok = ort_ok = agree_int = agree_ort = 0
    for i, (x, y) in enumerate(batches):
        ref, sim = simulation_codes(q, x)
        if i < layer_batches:
            out, codes = im.run(x, record=True)
            _, forced = im.run(x, force=sim, record=True)
            acc["engine_per_layer"] = _merge(acc["engine_per_layer"], compare_codes(forced, sim))
            acc["engine_end_to_end"] = _merge(acc["engine_end_to_end"], compare_codes(codes, sim))
            got = ort_codes(*forced_model, x, force=sim, threads=threads)[1]
            acc["ort_per_layer"] = _merge(acc["ort_per_layer"], compare_codes(got, sim))
            got = ort_codes(*free_model, x, threads=threads)[1]
            acc["ort_end_to_end"] = _merge(acc["ort_end_to_end"], compare_codes(got, sim))
        else:
            out = im(x)
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
           "ort_form": form, **{k: _final(v) for k, v in acc.items()},
           "prediction_agreement_engine": agree_int / n, "prediction_agreement_ort": agree_ort / n,
           "seconds": round(time.time() - t0, 1)}
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


def _float_top1(model, test):
    with torch.no_grad():
        return 100 * sum(int((model(x).argmax(1) == y).sum()) for x, y in test) / sum(len(y) for _, y in test)


def resnet20(args) -> list[dict]:
    from qcnn.checkpoint import load_model
    from qcnn.data import get_data
    from qcnn.models import build_model

    b = get_data("cifar10", args.cifar, batch_size=128, augment=False, calib_size=512)
    test = _batches(b.test, args.test_images)
    calib = [x for x, _ in _batches(b.calib, 512)]

    def float_model():
        return build_model("resnet20", weights=str(SHARED / "weights" / "resnet20-12fca82f.th")).eval()

    float_top1 = _float_top1(float_model(), test)
    out = []
    for variant in args.resnet:
        q = _ptq(float_model(), calib, not args.no_bias_quant, deploy=variant == "deploy")
        label = "W8A8 PTQ" if variant == "ptq" else "W8A8 int8 deployment"
        r = measure(f"resnet20 {label} (cifar10-jpeg)", q, test, True, args.layer_batches, args.threads)
        r["float_top1"] = float_top1
        out.append(r)
    for ck in args.fqn:
        if Path(ck).exists():
            q, info = load_model(ck)
            r = measure(f"resnet20 FQN W{info['recipe']['w_bits']}A{info['recipe']['a_bits']} ({ck})", q, test, True,
                        args.layer_batches, args.threads)
            r["float_top1"] = float_top1
            out.append(r)
    return out


def lenet(args) -> list[dict]:
    from qcnn.checkpoint import load_model
    from qcnn.data import get_data

    if not Path(args.lenet).exists():
        print(f"skipping LeNet-5: {args.lenet} not found")
        return []
    b = get_data("fashion-mnist", None, batch_size=256, augment=False, calib_size=1000)
    test = _batches(b.test, args.test_images)
    model, _ = load_model(args.lenet)
    model.eval()
    float_top1 = _float_top1(model, test)
    q = _ptq(model, [x for x, _ in _batches(b.calib, 1000)], not args.no_bias_quant)
    r = measure("lenet5 W8A8 PTQ (fashion-mnist)", q, test, True, args.layer_batches, args.threads)
    r["float_top1"] = float_top1
    return [r]


def mobilenet(args) -> list[dict]:
    import torchvision
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.functional import center_crop, normalize, resize

    samples = sorted((ROOT / ".data" / "imagenet_samples").glob("*.jpg"))[: args.mnv2_images]
    if not samples:
        print("skipping MobileNetV2: no sample JPEGs in .data/imagenet_samples")
        return []
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(SHARED / "weights" / "mobilenet_v2-b0353104.pth", weights_only=True))
    model.eval()
    imgs, labels = [], []
    for f in samples:
        t = decode_jpeg(read_file(str(f))).float() / 255
        t = center_crop(resize(t, 256, antialias=True), 224)
        imgs.append(normalize(t, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
        labels.append(int(f.stem.rsplit("_", 1)[1]))
    x, y = torch.stack(imgs), torch.tensor(labels)
    test = [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(x), 10)]
    float_top1 = _float_top1(model, test)
    q = _ptq(model, [x], not args.no_bias_quant)  # calibrated on the same few images (no other ImageNet data)
    r = measure(f"mobilenet_v2 W8A8 PTQ ({len(x)} ImageNet sample JPEGs)", q, test, True, 1, args.threads)
    r["float_top1"] = float_top1
    return [r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--layer-batches", type=int, default=1, help="batches for the per-layer / end-to-end codes")
    p.add_argument("--cifar", default=str(SHARED / "cifar10-jpeg.zip"))
    p.add_argument("--lenet", default=str(ROOT / "runs" / "float_lenet5_v2" / "model.pt"))
    p.add_argument("--resnet", nargs="*", default=["ptq", "deploy"], choices=["ptq", "deploy"])
    p.add_argument("--fqn", nargs="*", default=[])
    p.add_argument("--mnv2-images", type=int, default=20)
    p.add_argument("--no-bias-quant", action="store_true", help="keep float biases in the simulation")
    p.add_argument("--models", nargs="*", default=["lenet5", "resnet20", "mobilenet_v2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "integer_agreement"))
    p.add_argument("--merge", nargs="*", default=None,
                   help="only combine the results of earlier runs (their .json files) into --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    if args.merge is not None:
        cmds = []
        for f in args.merge:
            part = json.loads(Path(f).read_text())
            rows += part["results"]
            cmds.append(f"{part.get('command')} ({part['date']}, 1-min load average {part.get('load_avg_1min')})")
        return write(rows, Path(args.out), "; ".join(cmds))
    for name, fn in (("lenet5", lenet), ("resnet20", resnet20), ("mobilenet_v2", mobilenet)):
        if name in args.models:
            rows += fn(args)
    cmd = sys.argv[1:] if argv is None else list(argv)
    return write(rows, Path(args.out), " ".join(["python benchmarks/integer_agreement.py"] + cmd))


def write(rows: list[dict], out: Path, command: str | None = None) -> int:
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "onnxruntime": __import__("onnxruntime").__version__, "load_avg_1min": round(os.getloadavg()[0], 2),
           "command": command, "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")

    def pct(v):
        return f"{100 * v:.4f} %"

    def cell(r, k):
        c = r.get(k)
        return "-" if c is None else f"{pct(c['equal'])} ({c['max_diff']})"

    lines = ["# Integer engine / ONNX Runtime vs fake-quant simulation", "",
             f"{res['date']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}. Command(s): {command}", "",
             "Codes: fraction equal to the simulation's (max |difference| in LSB). Top-1 in percent; "
             "agreement = predictions equal to the simulation's.", "",
             "| model | images | ORT form | engine per layer | ORT per layer | engine end to end | ORT end to end | "
             "float top-1 | fake-quant top-1 | integer top-1 | ORT top-1 | agreement engine / ORT |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tops = [f"{r[k]:.2f}" if k in r else "-" for k in ("float_top1", "top1_fakequant", "top1_integer",
                                                             "top1_ort")]
        lines.append(f"| {r['model']} | {r['images']} | {r.get('ort_form', 'qdq')} | {cell(r, 'engine_per_layer')} | "
                     f"{cell(r, 'ort_per_layer')} | {cell(r, 'engine_end_to_end')} | {cell(r, 'ort_end_to_end')} | "
                     + " | ".join(tops) + f" | {pct(r['prediction_agreement_engine'])} / "
                     f"{pct(r['prediction_agreement_ort'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Integer engine and ONNX Runtime vs the fake-quant simulation, in integer codes and top-1.

For each model the quantized network (fake-quant simulation, eval mode) defines the expected codes of
every quantizer (layer inputs, residual sums). Reported per model:

* ``per_layer``: codes of each layer computed by a runtime from exactly the simulation's input codes (teacher
  forcing): fraction equal and max |difference| in LSB (first ``--layer-batches`` batches);
* ``end_to_end``: the same with the runtime on its own codes (differences spread with depth);
* ``top1``: simulations and runtimes on the test images, and the prediction agreement of each with the
  simulation.

The reference is the simulation evaluated in float64 (:func:`qcnn.integer.agreement.simulation_codes`,
``dtype=torch.float64``); the float32 simulation, as it runs in training, is reported beside it (its own
rounding flips codes near ties). Runtimes: the integer engine, ONNX Runtime on the integer ONNX form
(``form="integer"``), ONNX Runtime on the fast QLinear/QDQ form (float32 requantization).

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
    from qcnn.methods import quantize

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


RUNTIMES = ("engine", "ort_integer", "ort_fast")


@torch.no_grad()
def measure(name: str, q, batches, labelled: bool, layer_batches: int = 1, threads: int = 2) -> dict:
    """Agreement figures of quantized model ``q`` over ``batches`` of (x, y) (y may be None).

    References: the simulation evaluated in float64 (``sim64``, exact arithmetic on the same grids) and as it
    runs in training (float32, ``sim32``). Runtimes: the integer engine, ONNX Runtime on the integer form
    (``ort_integer``) and on the fast form (``ort_fast``: QLinear where the graph allows it, else QDQ)."""
    from qcnn.integer import to_integer
    from qcnn.integer.agreement import compare_codes, simulation_codes
    from qcnn.integer.onnx_export import OrtModel, ort_codes, to_onnx

    t0 = time.time()
    im = to_integer(q, batches[0][0])
    try:
        fast_form, fast = "qlinear", to_onnx(im, form="qlinear")
    except ValueError:
        fast_form, fast = "qdq", to_onnx(im, form="qdq")
    forms = {"ort_integer": "integer", "ort_fast": fast_form}
    sessions = {"ort_integer": OrtModel(to_onnx(im, form="integer"), threads=threads),
                "ort_fast": OrtModel(fast, threads=threads)}
    coded = {k: (to_onnx(im, with_codes=True, forced=True, form=f), to_onnx(im, with_codes=True, form=f))
             for k, f in forms.items()}
    acc: dict[str, dict | None] = {}
    n = 0
    correct = {k: 0 for k in ("sim32", "sim64") + RUNTIMES}
    agree = {f"{k}_vs_{r}": 0 for k in RUNTIMES + ("sim32",) for r in ("sim64", "sim32")}
    for i, (x, y) in enumerate(batches):
        ref32, sim32 = simulation_codes(q, x)
        ref64, sim64 = simulation_codes(q, x, dtype=torch.float64)
        if i < layer_batches:
            out, codes = im.run(x, record=True)
            _, forced = im.run(x, force=sim64, record=True)
            got = {"engine": (forced, codes)}
            for k, (forced_m, free_m) in coded.items():
                got[k] = (ort_codes(*forced_m, x, force=sim64, threads=threads)[1],
                          ort_codes(*free_m, x, threads=threads)[1])
            for k, (per_layer, e2e) in got.items():
                for key, g, ref in ((f"{k}_per_layer", per_layer, sim64), (f"{k}_end_to_end", e2e, sim64),
                                    (f"{k}_end_to_end_sim32", e2e, sim32)):
                    acc[key] = _merge(acc.get(key), compare_codes(g, ref))
            acc["sim32_end_to_end"] = _merge(acc.get("sim32_end_to_end"), compare_codes(sim32, sim64))
        else:
            out = im(x)
        preds = {"sim32": ref32.argmax(1), "sim64": ref64.argmax(1), "engine": out.argmax(1)}
        for k, sess in sessions.items():
            preds[k] = sess(x).argmax(1)
        for k in RUNTIMES + ("sim32",):
            for r in ("sim64", "sim32"):
                agree[f"{k}_vs_{r}"] += int((preds[k] == preds[r]).sum())
        if labelled:
            for k, p_ in preds.items():
                correct[k] += int((p_ == y).sum())
        n += x.shape[0]
    res = {"model": name, "images": n, "integer_ops": len(im.ops), "quantizer_points": len(im.points),
           "ort_fast_form": fast_form, "codes": {k: _final(v) for k, v in acc.items()},
           "prediction_agreement": {k: v / n for k, v in agree.items()}, "seconds": round(time.time() - t0, 1)}
    if labelled:
        res["top1"] = {k: 100 * v / n for k, v in correct.items()}
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
        c = r["codes"].get(k)
        return "-" if c is None else f"{pct(c['equal'])} ({c['max_diff']})"

    lines = ["# Integer engine / ONNX Runtime vs the fake-quant simulation", "",
             f"{res['date']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}. Command(s): {command}", "",
             "Codes: fraction of the quantizer codes equal to the reference's (max |difference| in LSB), per layer "
             "(each layer fed the reference's input codes) and end to end (each runtime on its own codes), over "
             "the first batches. References: the simulation evaluated in float64 (same grids, exact arithmetic) "
             "and in float32 (as in training). Runtimes: the integer engine (int64 requantization), ONNX Runtime "
             "on the integer ONNX form, ONNX Runtime on the fast form (QLinear, or QDQ where noted: float32 "
             "requantization). Top-1 in percent on all the images; agreement = predictions equal to the "
             "reference's.", "",
             "| model | images | runtime | per layer vs float64 sim | end to end vs float64 sim | "
             "end to end vs float32 sim | top-1 | top-1 float64 / float32 sim | agreement with float64 / float32 sim |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    names = {"engine": "integer engine", "ort_integer": "ORT integer form", "ort_fast": "ORT {form}",
             "sim32": "float32 simulation"}
    for r in rows:
        t = r.get("top1", {})
        sims = f"{t['sim64']:.2f} / {t['sim32']:.2f}" if t else "-"
        for k in RUNTIMES + ("sim32",):
            label = names[k].format(form=r["ort_fast_form"])
            per = "-" if k == "sim32" else cell(r, f"{k}_per_layer")
            e64 = cell(r, f"{k}_end_to_end")
            e32 = "-" if k == "sim32" else cell(r, f"{k}_end_to_end_sim32")
            a = r["prediction_agreement"]
            ag = f"{pct(a[f'{k}_vs_sim64'])} / {pct(a[f'{k}_vs_sim32'])}"
            top = f"{t[k]:.2f}" if t else "-"
            model = r["model"] + (f", float {r['float_top1']:.2f}" if "float_top1" in r else "")
            lines.append(f"| {model} | {r['images']} | {label} | {per} | {e64} | {e32} | {top} | {sims} | {ag} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

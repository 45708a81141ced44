"""CPU inference speed of ResNet-20 (batch 128): fp32 eager vs qcnn's int8 deployment vs torch.ao int8 (x86).

All engines run in one process with the same number of threads (``--threads``, one table each), timed
round-robin (one call of each engine per round, ``--reps`` rounds after ``--warmup``; median per engine) so
that a change of machine load hits every engine alike; each timed call follows a pause and an untimed call of
the same engine (see :func:`round_robin`). The 1-minute load average before and after is recorded.

* ``fp32 eager``: the float ``torch.nn`` model;
* ``qcnn int8, ONNX Runtime QLinear NHWC``: the deployment model (uniform W8A8, per-channel symmetric weights,
  BN folded, conv outputs feeding residual adds quantized (:func:`qcnn.integer.add_residual_quantizers`),
  biases on the int32 accumulator grid (:func:`qcnn.integer.add_bias_quantizers`), each ReLU'd residual sum
  quantized once on the grid of the convs reading it (:func:`qcnn.integer.share_relu_grids`)), compiled by
  :func:`qcnn.integer.to_integer` and exported with ``to_onnx(form="qlinear")``: com.microsoft QLinearConv /
  QLinearAdd on channels-last uint8 codes end to end;
* ``qcnn int8, ONNX Runtime QDQ``: the same model in the portable QDQ form (ORT fuses what it can);
* ``qcnn int8, PyTorch quantized kernels``: the same integer model lowered by
  :func:`qcnn.integer.torch_backend.to_torch_quantized` onto ``torch.ops.quantized`` (x86: fbgemm);
* ``torch.ao int8 x86``: ``prepare_fx`` / ``convert_fx``, default x86 qconfig, same calibration images;
* ``qcnn reference integer engine`` (``--engine``): int64 tensors, exactness not speed.

Weights: the pretrained ``resnet20-12fca82f.th``. Calibration: 512 CIFAR-10 JPEG training images (the calib
tail); timing: the first test batch. Accuracy and prediction agreement with the fake-quant simulation are
measured on the first ``--test-images`` test images (random normal inputs make almost every prediction a
near-tie, so agreement on noise says little). Writes ``benchmarks/results/int8_speed.{json,md}``.

    python benchmarks/int8_speed.py --threads 2 1 --reps 15 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "resnet20-12fca82f.th"
RECIPE = {"method": "uniform", "w_bits": 8, "a_bits": 8, "first_last": "8bit", "fold_bn": True, "per_channel": True}


def deployment_model(model, calib):
    """The int8 deployment simulation of a float model (see module docstring), calibrated on ``calib``."""
    from qcnn.calib import calibrating
    from qcnn.integer import add_bias_quantizers, add_residual_quantizers, share_relu_grids
    from qcnn.methods import quantize

    q = quantize(model, RECIPE).eval()
    add_residual_quantizers(q)
    add_bias_quantizers(q)
    with torch.no_grad(), calibrating(q):
        for x in calib:
            q(x)
    return share_relu_grids(q)


def torch_ao_model(model, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping(torch.backends.quantized.engine), (calib[0][:1],))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return convert_fx(prepared)


def round_robin(fns: dict, x, warmup: int, reps: int, pause: float = 0.5) -> dict[str, list[float]]:
    """Seconds per call of each engine (one list per engine), one timed call per engine per round.

    Before each timed call the engine sleeps ``pause`` seconds (so that the worker threads of the engine timed
    before it, e.g. ONNX Runtime's spinning intra-op threads, have gone idle: they slow the next engine down
    by up to 2x otherwise) and then runs one untimed call (its own threads are awake, as in steady-state
    serving)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn(x)
        for _ in range(reps):
            for k, fn in fns.items():
                time.sleep(pause)
                fn(x)
                t = time.perf_counter()
                fn(x)
                times[k].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="one timing table per thread count")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--test-images", type=int, default=2000, help="images for top-1 / agreement (0: skip)")
    p.add_argument("--data-dir", default=str(SHARED / "cifar10-jpeg.zip"))
    p.add_argument("--engine", action="store_true", help="also time the reference integer engine (slow)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_speed"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads[0])
    torch.manual_seed(0)

    import onnxruntime

    from qcnn.data import get_data
    from qcnn.integer import to_integer
    from qcnn.integer.onnx_export import OrtModel, optimized_op_counts, to_onnx
    from qcnn.integer.torch_backend import to_torch_quantized
    from qcnn.models import build_model

    def float_model():
        return build_model("resnet20", weights=str(WEIGHTS)).eval()

    data = get_data("cifar10", args.data_dir, batch_size=args.batch, augment=False, calib_size=512)
    calib = [x for x, _ in data.calib]
    x = next(iter(data.test))[0][: args.batch]
    if x.shape[0] < args.batch:
        raise ValueError(f"--batch {args.batch} is larger than the test loader's batch")

    model = float_model()
    q = deployment_model(float_model(), calib)
    im = to_integer(q, x)
    tq = to_torch_quantized(im)
    tao = torch_ao_model(float_model(), calib)

    def ort_fn(o):
        return lambda t: o.session.run(None, {o.input_name: t.numpy()})

    timings = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        ort_ql = OrtModel(to_onnx(im, form="qlinear"), threads=threads)
        ort_qdq = OrtModel(to_onnx(im, form="qdq"), threads=threads)
        fns = {"fp32 eager (PyTorch)": model, "qcnn int8: ONNX Runtime, QLinear NHWC form": ort_fn(ort_ql),
               "qcnn int8: ONNX Runtime, QDQ form": ort_fn(ort_qdq),
               "qcnn int8: PyTorch quantized kernels (to_torch_quantized)": tq,
               "torch.ao int8 x86 (prepare_fx/convert_fx)": tao}
        load_before = os.getloadavg()[0]
        secs = round_robin(fns, x, args.warmup, args.reps)
        if args.engine:
            secs.update(round_robin({"qcnn reference integer engine (int64)": im}, x, 1, 2))
        load_after = os.getloadavg()[0]
        med = {k: sorted(v)[len(v) // 2] for k, v in secs.items()}
        t_fp32 = med["fp32 eager (PyTorch)"]
        rows = [{"engine": k, "seconds": v, "ms_per_batch": round(1000 * v, 2), "ms_min": round(1000 * min(secs[k]), 2),
                 "ms_all": [round(1000 * t, 2) for t in secs[k]], "images_per_s": round(args.batch / v, 1),
                 "speedup_vs_fp32": round(t_fp32 / v, 2),
                 "speedup_vs_fp32_min": round(min(secs["fp32 eager (PyTorch)"]) / min(secs[k]), 2)}
                for k, v in med.items()]
        timings.append({"threads": threads, "load_avg_1min_before": round(load_before, 2),
                        "load_avg_1min_after": round(load_after, 2), "results": rows})
        del ort_ql, ort_qdq
    torch.set_num_threads(args.threads[0])
    ort_ql = OrtModel(to_onnx(im, form="qlinear"), threads=args.threads[0])
    ort_qdq = OrtModel(to_onnx(im, form="qdq"), threads=args.threads[0])

    accuracy = {}
    if args.test_images > 0:
        preds: dict[str, list] = {k: [] for k in ("fp32", "fakequant", "ort_qlinear", "ort_qdq", "torch_quantized",
                                                  "torch_ao")}
        labels, seen = [], 0
        with torch.inference_mode():
            for xb, yb in data.test:
                preds["fp32"].append(model(xb).argmax(1))
                preds["fakequant"].append(q(xb).argmax(1))
                preds["ort_qlinear"].append(ort_ql(xb).argmax(1))
                preds["ort_qdq"].append(ort_qdq(xb).argmax(1))
                preds["torch_quantized"].append(tq(xb).argmax(1))
                preds["torch_ao"].append(tao(xb).argmax(1))
                labels.append(yb)
                seen += yb.numel()
                if seen >= args.test_images:
                    break
        y = torch.cat(labels)[: args.test_images]
        pr = {k: torch.cat(v)[: args.test_images] for k, v in preds.items()}
        accuracy = {"images": int(y.numel()), "top1": {k: round(100 * float((v == y).float().mean()), 2)
                                                       for k, v in pr.items()},
                    "agreement_with_fakequant": {k: round(100 * float((v == pr["fakequant"]).float().mean()), 2)
                                                 for k, v in pr.items() if k != "fakequant"}}

    fused = optimized_op_counts(to_onnx(im, form="qlinear"), threads=args.threads[0])
    fused_qdq = optimized_op_counts(to_onnx(im, form="qdq"), threads=args.threads[0])
    res = {"model": "resnet20", "batch": args.batch, "reps": args.reps, "warmup": args.warmup,
           "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "timings": timings,
           "ort_optimized_ops_qlinear": fused, "ort_optimized_ops_qdq": fused_qdq, "accuracy": accuracy}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# ResNet-20 int8 inference speed (batch {args.batch})", "",
             f"{res['date']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}, {res['cpu_count']}-core CPU; "
             f"median of {args.reps} round-robin rounds after {args.warmup} warm-up rounds. Command: `python "
             f"benchmarks/int8_speed.py {' '.join(argv) if argv is not None else ' '.join(sys.argv[1:])}`."]
    for t in timings:
        lines += ["", f"{t['threads']} thread(s), 1-min load average {t['load_avg_1min_before']} before, "
                  f"{t['load_avg_1min_after']} after:", "",
                  "| engine | ms / batch (median) | images / s | speed-up vs fp32 eager | fastest call (ms) | "
                  "speed-up, fastest calls |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['engine']} | {r['ms_per_batch']} | {r['images_per_s']} | {r['speedup_vs_fp32']}x | "
                  f"{r['ms_min']} | {r['speedup_vs_fp32_min']}x |" for r in t["results"]]
    lines += ["", "ONNX Runtime's optimised graph, QLinear form: " + ", ".join(f"{k} x{v}" for k, v in fused.items()),
              "", "QDQ form: " + ", ".join(f"{k} x{v}" for k, v in fused_qdq.items())]
    if accuracy:
        lines += ["", f"First {accuracy['images']} CIFAR-10 JPEG test images:", "",
                  "| engine | top-1 | prediction agreement with fake-quant |", "|---|---:|---:|"]
        for k, v in accuracy["top1"].items():
            agree = accuracy["agreement_with_fakequant"].get(k)
            lines.append(f"| {k} | {v:.2f} | {'-' if agree is None else f'{agree:.2f} %'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

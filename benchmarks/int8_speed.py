"""CPU inference speed of ResNet-20 (batch 128): fp32 eager vs qcnn's int8 deployment vs torch.ao int8 (x86).

All engines run in one process with the same number of threads (``--threads``, reported):

* ``fp32 eager``: the float ``torch.nn`` model;
* ``qcnn int8 (ONNX Runtime)``: the uniform 8-bit model (BN folded, conv outputs feeding the residual adds
  quantized with :func:`qcnn.integer.add_residual_quantizers`), compiled by :func:`qcnn.integer.to_integer`,
  exported as QDQ ONNX and run by ONNX Runtime, whose optimiser fuses it to QLinearConv / QLinearAdd / QGemm;
* ``qcnn integer engine``: the reference integer-only engine (int64 tensors; exactness, not speed);
* ``torch.ao int8 x86``: ``prepare_fx`` / ``convert_fx`` with the x86 backend config.

Weights are the pretrained ``resnet20-12fca82f.th``; calibration and timing use random normal batches
(speed does not depend on the values). Writes ``benchmarks/results/int8_speed.{json,md}``.

    python benchmarks/int8_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "data" / "weights" / "resnet20-12fca82f.th"


def _time(fn, x, warmup: int, reps: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn(x)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-engine", action="store_true", help="do not time the reference integer engine")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8_speed"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from qcnn.calib import calibrating
    from qcnn.integer import add_residual_quantizers, to_integer
    from qcnn.integer.onnx_export import OrtModel, optimized_op_counts, to_onnx
    from qcnn.models import build_model
    from qcnn.transform import quantize

    model = build_model("resnet20", weights=str(WEIGHTS) if WEIGHTS.exists() else None).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    calib = torch.randn(256, 3, 32, 32)
    rows = []

    with torch.inference_mode():
        t_fp32 = _time(model, x, args.warmup, args.reps)
    rows.append({"engine": "fp32 eager (PyTorch)", "seconds": t_fp32})

    q = quantize(model, {"method": "uniform", "w_bits": 8, "a_bits": 8, "first_last": "8bit", "fold_bn": True})
    q = add_residual_quantizers(q.eval())
    with torch.no_grad(), calibrating(q):
        q(calib)
    im = to_integer(q, x)
    onnx_model = to_onnx(im)
    ort = OrtModel(onnx_model, threads=args.threads)
    xn = x.numpy()
    t_ort = _time(lambda a: ort.session.run(None, {ort.input_name: a}), xn, args.warmup, args.reps)
    rows.append({"engine": "qcnn int8 QDQ -> ONNX Runtime", "seconds": t_ort})
    fused = optimized_op_counts(onnx_model, threads=args.threads)

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    try:
        from torch.ao.quantization.backend_config import get_x86_backend_config
        backend = get_x86_backend_config()
    except ImportError:  # older torch
        backend = None
    torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    prepared = prepare_fx(build_model("resnet20", weights=str(WEIGHTS) if WEIGHTS.exists() else None).eval(),
                          get_default_qconfig_mapping("x86"), (calib[:1],), backend_config=backend)
    with torch.no_grad():
        prepared(calib)
    tao = convert_fx(prepared, backend_config=backend)
    with torch.inference_mode():
        t_ao = _time(tao, x, args.warmup, args.reps)
    rows.append({"engine": "torch.ao int8 x86 (prepare_fx/convert_fx)", "seconds": t_ao})

    if not args.skip_engine:
        t_int = _time(im, x, 1, 2)
        rows.append({"engine": "qcnn reference integer engine (int64)", "seconds": t_int})

    with torch.no_grad():
        ref = q(x)
        agree_ort = float((ort(x).argmax(1) == ref.argmax(1)).float().mean())
        agree_ao = float((tao(x).argmax(1) == model(x).argmax(1)).float().mean())
    for r in rows:
        r["ms_per_batch"] = round(1000 * r["seconds"], 2)
        r["images_per_s"] = round(args.batch / r["seconds"], 1)
        r["speedup_vs_fp32"] = round(t_fp32 / r["seconds"], 2)
    res = {"model": "resnet20", "batch": args.batch, "threads": args.threads, "reps": args.reps,
           "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
           "cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": rows,
           "ort_optimized_ops": fused, "top1_agreement_ort_vs_fakequant": agree_ort,
           "top1_agreement_torchao_vs_fp32": agree_ao}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"# ResNet-20 int8 inference speed (batch {args.batch}, {args.threads} threads)", "",
             f"{res['date']}, torch {res['torch']}, onnxruntime {res['onnxruntime']}, median of {args.reps} runs.",
             "", "| engine | ms / batch | images / s | speed-up vs fp32 eager |", "|---|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['ms_per_batch']} | {r['images_per_s']} | {r['speedup_vs_fp32']}x |"
              for r in rows]
    lines += ["", "ONNX Runtime's optimised graph: " + ", ".join(f"{k} x{v}" for k, v in fused.items()), "",
              f"Prediction agreement ORT vs fake-quant simulation: {agree_ort:.4f}; torch.ao vs fp32: {agree_ao:.4f}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

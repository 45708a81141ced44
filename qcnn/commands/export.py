"""``qcnn export``: write a quantized checkpoint as an integer model users can run and read.

* ``--format onnx``: ONNX (opset 13) in QDQ form, int8 weights with per-channel ``DequantizeLinear(axis=0)``
  and int32 biases; ONNX Runtime fuses it to QLinearConv / QLinearAdd / QGemm. ``--onnx-form qlinear``:
  ONNX Runtime's channels-last integer operators; ``--onnx-form integer``: the engine's own integer arithmetic
  (ConvInteger, MatMulInteger, int64 requantization), bit-exact with ``qcnn eval --engine integer``.
* ``--onnx-form torch`` / ``tensorrt``: the fake-quant model through torch's own ONNX exporter
  (:mod:`qcnn.integer.onnx_torch`): any model, float ops between Q/DQ pairs, dynamic batch / height / width
  (``--dynamic``); ``tensorrt`` checks TensorRT's int8 rules (symmetric, zero point 0).
* ``--format int``: ``FILE.npz`` (integer weight codes, int4 bit-packed for <= 4-bit weights, int32 biases,
  requantization multipliers and shifts, scales) and ``FILE.json`` (the graph: one entry per integer
  operation with its attributes and the npz keys of its tensors); :meth:`qcnn.integer.IntegerModel.load`
  runs it back without the PyTorch model.

The checkpoint must be quantized and calibrated (made by ``qcnn ptq`` or ``qcnn qat``). The input shape
comes from ``--input-shape C,H,W``, else from ``--dataset``, else from the model (32x32 CIFAR / 28x28 MNIST
zoo models, 224x224 torchvision models).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

FORMATS = ("onnx", "int")


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a quantized checkpoint as ONNX (QDQ) or plain integer files",
                       description="Compile a quantized checkpoint to integer-only operations and write it as "
                                   "ONNX QDQ or as .npz + .json.")
    p.add_argument("--checkpoint", required=True, help="quantized qcnn checkpoint (model.pt)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default; see --onnx-form) or int: the integer model as FILE.npz (codes, multipliers) "
                        "+ FILE.json (the graph)")
    p.add_argument("--onnx-form", choices=("qdq", "qlinear", "integer", "torch", "tensorrt"), default="qdq",
                   help="qdq: QuantizeLinear/DequantizeLinear around float ops (any runtime); qlinear: ONNX "
                        "Runtime's integer operators end to end, uint8 NHWC (fastest in ONNX Runtime); integer: "
                        "ConvInteger/MatMulInteger and the int64 requantization in standard operators (bit-exact "
                        "with the integer engine); these three are compiled from the integer model (fixed input "
                        "shape). torch: the fake-quant model through torch.onnx.export (dynamo), one "
                        "QuantizeLinear/DequantizeLinear pair per quantizer and float ops between, for any model, "
                        "dynamic shapes (see --dynamic); tensorrt: the same, checked for TensorRT (signed int8 "
                        "activations with zero point 0, symmetric int8 weights)")
    p.add_argument("--dynamic", choices=("auto", "spatial", "batch", "none"), default="auto",
                   help="dynamic input dimensions of the torch / tensorrt forms: spatial (batch, height, width), "
                        "batch, none, or auto (default: spatial where the model runs on other sizes, else batch)")
    p.add_argument("--requant", choices=("int64", "int32"), default="int64",
                   help="requantization arithmetic of the integer model: int64 (one rounding of int64 products, "
                        "31-bit multipliers) or int32 (gemmlowp / TFLite MultiplyByQuantizedMultiplier)")
    p.add_argument("--out", required=True, help="output file (.onnx, or the stem of .npz/.json)")
    p.add_argument("--model", default=None, help="(checked against the checkpoint)")
    p.add_argument("--dataset", default=None, help="dataset whose image shape to use")
    p.add_argument("--data-dir", default=None,
                   help="dataset folder or archive of --dataset (default: standard locations)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input image, e.g. 3,32,32")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=run)


def _input_shape(args, arch: dict) -> tuple[int, int, int]:
    if args.input_shape:
        try:
            shape = tuple(int(t) for t in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"--input-shape {args.input_shape!r} must be C,H,W (three positive integers)")
        return shape
    c = int(arch.get("in_channels", 3))
    if args.dataset:
        from qcnn.data import get_data

        b = get_data(args.dataset, args.data_dir, batch_size=2, augment=False)
        side = b.image_size if isinstance(b.image_size, int) else tuple(b.image_size)[-1]
        return (b.in_channels, int(side), int(side))
    side = arch.get("kwargs", {}).get("image_size")
    if side is None:
        side = 224 if str(arch["name"]).startswith("tv:") else (28 if c == 1 else 32)
    return (c, int(side), int(side))


def run(args) -> int:
    import torch

    from qcnn.checkpoint import load_model
    from qcnn.integer import to_integer

    t0 = time.time()
    model, info = load_model(args.checkpoint)
    if not info.get("recipe"):
        raise ValueError(f"checkpoint {args.checkpoint!r} is not quantized; quantize it first (qcnn ptq / qat)")
    arch = info["arch"]
    if args.model and args.model != arch["name"]:
        raise ValueError(f"checkpoint {args.checkpoint!r} holds a {arch['name']!r} model, not {args.model!r}")
    shape = _input_shape(args, arch)
    out = Path(args.out)
    if args.format == "onnx" and args.onnx_form in ("torch", "tensorrt"):
        from qcnn.integer.onnx_torch import to_onnx_torch

        out = out if out.suffix == ".onnx" else out.with_suffix(".onnx")
        style = "tensorrt" if args.onnx_form == "tensorrt" else "onnxruntime"
        mp = to_onnx_torch(model, torch.zeros((2,) + shape), out, style=style, dynamic=args.dynamic)
        figures = {"format": "onnx", "onnx_form": args.onnx_form, "model": arch["name"], "input_shape": list(shape),
                   "dynamic": {p.key: p.value for p in mp.metadata_props}.get("qcnn_dynamic", args.dynamic),
                   "nodes": len(mp.graph.node),
                   "qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in mp.graph.node), "files": [str(out)],
                   "seconds": round(time.time() - t0, 2)}
        return _report(figures, args)
    im = to_integer(model, torch.zeros((1,) + shape), requant=args.requant)
    figures = {"format": args.format, "model": arch["name"], "input_shape": list(shape),
               "integer_ops": len(im.ops), "layers": im.meta.get("layers"), "requant": args.requant}
    if args.format == "onnx":
        from qcnn.integer.onnx_export import to_onnx

        if out.suffix != ".onnx":
            out = out.with_suffix(".onnx")
        to_onnx(im, out, form=args.onnx_form)
        figures["files"] = [str(out)]
        figures["onnx_form"] = args.onnx_form
    else:
        npz, js = im.save(out)
        figures["files"] = [str(npz), str(js)]
    figures["seconds"] = round(time.time() - t0, 2)
    return _report(figures, args)


def _report(figures: dict, args) -> int:
    for k, v in figures.items():
        print(f"{k}: {v}")
    if args.json:
        print(json.dumps(figures), flush=True)
    return 0

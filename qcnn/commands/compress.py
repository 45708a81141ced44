"""``qcnn compress``: write a quantized checkpoint as a compressed ``.qcz`` file and print its size.

    qcnn compress --checkpoint runs/clipq_resnet20/model.pt --out resnet20.qcz

Prints one row per conv/linear layer (encoding, codebook size, bits per code, zero fraction, bytes, ratio)
and the totals: bytes and compression ratio of all conv/linear weights (codebooks, sparsity patterns and
codes included) against fp32, and of the whole file against ``torch.save`` of the fp32 state_dict. The
format is described in :mod:`qcnn.compress`; ``qcnn eval --checkpoint model.qcz`` reads it back.
"""

from __future__ import annotations

import time


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="write a quantized model as a compressed .qcz file",
                       description="Bit-pack the codebook indices, sparsity patterns and codebooks of a quantized "
                                   "checkpoint (CLIP-Q, VNQ, any codebook or uniform grid) into one file.")
    p.add_argument("--checkpoint", required=True, help="a qcnn model checkpoint (model.pt from qcnn qat / ptq)")
    p.add_argument("--out", dest="output", required=True, help="compressed file to write (e.g. model.qcz)")
    p.add_argument("--half", action="store_true", help="store the other parameters (BN, biases) as fp16")
    p.add_argument("--quiet", action="store_true", help="no per-layer table")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=run)


def run(args) -> int:
    from qcnn.checkpoint import load_model
    from qcnn.commands.common import finish
    from qcnn.compress import compress_model, load_compressed

    t0 = time.time()
    model, info = load_model(args.checkpoint)
    if info.get("recipe") is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} holds a float model: quantize it first (qcnn qat/ptq)")
    stats = compress_model(model, args.output, arch=info["arch"], recipe=info["recipe"], metrics=info["metrics"],
                           half=args.half)
    # the file must decode to the very weights that were written
    back, _ = load_compressed(args.output)
    ref = dict(model.named_modules())
    for name, m in back.named_modules():
        if hasattr(m, "quantized_weight") and hasattr(ref.get(name), "quantized_weight"):
            import torch

            with torch.no_grad():
                if not torch.equal(m.quantized_weight(), ref[name].quantized_weight()):
                    raise RuntimeError(f"{args.output!r}: layer {name!r} does not decode to its quantized weights")
    if not args.quiet:
        print(f"{'layer':<24} {'shape':<16} {'kind':<9} {'layout':<8} {'levels':>6} {'bits':>4} {'zeros':>6} "
              f"{'bytes':>8} {'ratio':>6}")
        for r in stats["layers"]:
            shape = "x".join(str(s) for s in r["shape"])
            lv = "-" if r["levels"] is None else str(r["levels"])
            print(f"{r['name']:<24} {shape:<16} {r['kind']:<9} {r['encoding']:<8} {lv:>6} {r['code_bits']:>4} "
                  f"{100 * r['zero_fraction']:>5.1f}% {r['bytes']:>8} {r['ratio']:>6.2f}")
    figures = {"out": stats["path"], "weight_bytes": stats["weight_bytes"],
               "weight_fp32_bytes": stats["weight_fp32_bytes"], "weight_ratio": stats["weight_ratio"],
               "file_bytes": stats["file_bytes"], "fp32_bytes": stats["fp32_bytes"],
               "model_ratio": stats["model_ratio"], "seconds": round(time.time() - t0, 1)}
    return finish(args, figures)

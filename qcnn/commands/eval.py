"""``qcnn eval``: test accuracy of a model on a dataset with one of several inference engines.

``--engine float`` and ``fakequant`` run the PyTorch model (a quantized checkpoint is rebuilt with its
quantizers, so both evaluate its fake-quantized forward; ``float`` on a quantized checkpoint is refused).
Other engines (integer-only kernels, ONNX Runtime) are provided by :func:`qcnn.integer.run_engine`.
"""

from __future__ import annotations

import time

from qcnn.commands.common import (
    add_data_args,
    add_limit_args,
    add_model_args,
    add_output_args,
    finish,
    headline,
    load_data_from_args,
    load_model_from_args,
)

TORCH_ENGINES = ("float", "fakequant")
OTHER_ENGINES = ("integer", "onnx", "onnxruntime", "onnxruntime-integer")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model or checkpoint on a test set")
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--engine", default=None, choices=TORCH_ENGINES + OTHER_ENGINES,
                   help="float (default for float models), fakequant (default for quantized checkpoints), "
                        "integer, onnx / onnxruntime (integer-only inference, qcnn.integer; onnxruntime-integer: the "
                        "integer ONNX form, bit-exact with integer)")
    p.add_argument("--compile", action="store_true",
                   help="evaluate torch.compile(model) (float / fakequant engines; compiles at the first batch)")
    p.add_argument("--kernels", choices=["eager", "fused"], default=None,
                   help="quantizer kernels of the fakequant engine (default: $QCNN_KERNELS, else eager)")
    add_limit_args(p, train=False)
    add_output_args(p)
    p.set_defaults(func=run)


def run_engine(kind: str, model, loader) -> dict:
    """Evaluate ``model`` on ``loader`` with engine ``kind``; returns at least ``{"top1": ...}``."""
    if kind in TORCH_ENGINES:
        from qcnn.train import evaluate

        return evaluate(model, loader)
    try:
        from qcnn.integer import run_engine as integer_engine
    except ImportError:
        raise ValueError(f"engine {kind!r} is not available in this installation (qcnn.integer.run_engine "
                         "is missing)") from None
    return integer_engine(kind, model, loader)


def run(args) -> int:
    from qcnn.data import subset

    t0 = time.time()
    bundle = load_data_from_args(args, augment=False, calib_size=0)  # eval reads the test split only
    model, arch = load_model_from_args(args, bundle)
    info = args.checkpoint_info or {}
    quantized = bool(info.get("recipe"))
    engine = args.engine or ("fakequant" if quantized else "float")
    if engine == "float" and quantized:
        raise ValueError(f"checkpoint {args.checkpoint!r} is quantized ({info['recipe'].get('method')}); use "
                         "--engine fakequant, integer or onnx")
    if engine == "fakequant" and not quantized:
        raise ValueError("--engine fakequant needs a quantized checkpoint (made by qcnn ptq / qat)")
    loader = subset(bundle.test, args.limit_test) if args.limit_test else bundle.test
    if (args.compile or args.kernels) and engine not in TORCH_ENGINES:
        raise ValueError(f"--compile / --kernels apply to the float and fakequant engines, not --engine {engine}")
    model = model.eval()
    if args.compile:
        import torch

        model = torch.compile(model)
    from qcnn.quant import kernels

    with kernels.use(args.kernels):
        res = run_engine(engine, model, loader)
    figures = headline(res)
    figures.update({k: v for k, v in res.items() if k not in figures and k != "metric"})
    figures.update({"engine": engine, "model": arch["name"],
                    "images": res.get("images", getattr(loader, "num_samples", None)),
                    "seconds": round(time.time() - t0, 1)})
    return finish(args, figures)

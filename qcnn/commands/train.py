"""``qcnn train``: train (or fine-tune) a float model; writes OUT/metrics.jsonl, config.json, model.pt."""

from __future__ import annotations

import time
from pathlib import Path

from qcnn.commands.common import (
    add_data_args,
    add_limit_args,
    add_model_args,
    add_output_args,
    add_training_args,
    finish,
    headline,
    load_data_from_args,
    load_model_from_args,
    seed_everything,
    write_run_config,
)

#: defaults per (model, dataset) when the flag is not given; anything else falls back to TrainSpec's
DEFAULTS = {
    ("lenet5", "fashion-mnist"): dict(optimizer="adam", lr=0.01, schedule="onecycle", weight_decay=5e-4, augment=False,
                                      batch_size=128, epochs=3),
    ("lenet5", "mnist"): dict(optimizer="adam", lr=0.01, schedule="onecycle", weight_decay=5e-4, augment=False,
                              batch_size=128, epochs=3),
    ("yolo_tiny", "fashion-detection"): dict(optimizer="adamw", lr=0.003, schedule="onecycle", weight_decay=5e-4,
                                             batch_size=64, epochs=16),
    ("ssdlite", "fashion-detection"): dict(optimizer="adamw", lr=0.003, schedule="onecycle", weight_decay=5e-4,
                                           batch_size=64, epochs=16),
    ("resnet*", "cifar10"): dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, schedule="onecycle",
                                 weight_decay=5e-4, batch_size=256),
}


def defaults_for(model: str | None, dataset: str) -> dict:
    import fnmatch

    for (m, d), v in DEFAULTS.items():
        if model and fnmatch.fnmatchcase(model, m) and d == dataset:
            return dict(v)
    return {}


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune a float model",
                       description="Train a float model; with --out writes metrics.jsonl, config.json, last.pt "
                                   "(resumable with --resume) and model.pt.")
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("training")
    add_training_args(g)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false", default=None,
                   help="plain momentum SGD instead of Nesterov's")
    g.add_argument("--step-size", type=int, default=None, help="epochs between decays of the step schedule")
    g.add_argument("--gamma", type=float, default=None, help="decay factor of the step schedule")
    g.add_argument("--augment", dest="augment", action="store_true", default=None,
                   help="random crop (+ flip for CIFAR) on the training set (default: on, except lenet5 on MNIST-like)")
    g.add_argument("--amp", action="store_true", default=None, help="mixed precision (CUDA only)")
    add_limit_args(g)
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    add_output_args(p)
    p.set_defaults(func=run)


def spec_from_args(args):
    from qcnn.recipes import TrainSpec

    values = defaults_for(args.model, args.dataset)
    for k in ("epochs", "lr", "optimizer", "momentum", "nesterov", "schedule", "step_size", "gamma",
              "weight_decay", "augment", "amp", "batch_size", "kernels", "compile", "freeze_bn", "grad_clip"):
        v = getattr(args, k, None)
        if v is not None:
            values[k] = v
    return TrainSpec(**values)


def run(args) -> int:
    from qcnn.checkpoint import save_model
    from qcnn.train import check_spec, fit, is_main_process

    t0 = time.time()
    seed_everything(args.seed)
    spec = spec_from_args(args)
    if spec.epochs < 1:
        raise ValueError(f"--epochs {spec.epochs} trains nothing (the model would be saved as it was built); "
                         "use --epochs >= 1, or `qcnn eval` to evaluate a checkpoint")
    check_spec(spec)  # before the data is loaded
    args.batch_size = spec.batch_size
    bundle = load_data_from_args(args, augment=spec.augment)
    if args.limit_train:
        from qcnn.data import subset

        bundle.train = subset(bundle.train, args.limit_train)
    if args.limit_test:
        from qcnn.data import subset

        bundle.test = subset(bundle.test, args.limit_test)
    model, arch = load_model_from_args(args, bundle)
    info = getattr(args, "checkpoint_info", None)
    if info and info.get("recipe"):
        raise ValueError(f"--init {args.checkpoint!r} is a quantized checkpoint; `qcnn train` trains float "
                         "models (use `qcnn qat` to continue training a quantized one)")
    if args.resume and not args.out:
        raise ValueError("--resume needs --out (the run directory holding last.pt)")
    out = Path(args.out) if args.out else None
    if out is not None and is_main_process():
        config = {"model": arch, "dataset": args.dataset, "data_dir": args.data_dir, "init": args.checkpoint,
                  "seed": args.seed, "device": str(bundle.device), "limit_train": args.limit_train,
                  "limit_test": args.limit_test,
                  "train": spec.__dict__}
        write_run_config(out, args.resume, config)
    result = fit(model, bundle, spec, out, resume=args.resume)
    figures = {**headline(result), "loss": result["loss"], "epochs": result["epochs"],
               "seconds": round(time.time() - t0, 1)}
    if out is not None and is_main_process():
        save_model(out / "model.pt", model, arch,
                   metrics={**figures, "dataset": args.dataset, "history": result["history"]})
        figures["model"] = str(out / "model.pt")
    return finish(args, figures)

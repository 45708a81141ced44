"""Arguments and steps shared by the ``qcnn`` subcommands.

A subcommand builds its parser with :func:`add_data_args`, :func:`add_model_args`,
:func:`add_output_args` and the one flag vocabulary of all commands (:func:`add_limit_args`:
``--limit-train`` / ``--limit-test``; :func:`add_per_channel_args`: ``--per-channel`` / ``--per-tensor``;
:func:`add_training_args`), loads what it needs with :func:`load_data_from_args` and
:func:`load_model_from_args`, and ends with ``return finish(args, figures)``, which prints a summary and,
with ``--json``, one JSON object as the last line of stdout (e.g. ``{"top1": 90.12, "seconds": 41.2}``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qcnn.io import write_json

DEVICES = ("auto", "cpu", "cuda")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``0`` never silently means "all")."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"{v} must be a finite number > 0")
    return v


class _DeprecatedAlias(argparse.Action):
    """A former spelling of a flag, hidden from ``--help``: it still works, stores into the canonical flag's
    destination, and says on stderr which spelling to use."""

    def __init__(self, option_strings, dest, canonical: str, **kwargs):
        self.canonical = canonical
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated, use {self.canonical}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(g, old: str, canonical: str, dest: str, **kwargs) -> None:
    """Register ``old`` as a hidden, still working spelling of the flag ``canonical`` (same ``dest``)."""
    g.add_argument(old, dest=dest, action=_DeprecatedAlias, canonical=canonical, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS, **kwargs)


def add_limit_args(g, train: bool = True, test: bool = True) -> None:
    """``--limit-train N`` / ``--limit-test N``: the one spelling of every command for "use only the first N
    images" (the former ``--train-images`` / ``--test-images`` still work)."""
    if train:
        g.add_argument("--limit-train", type=positive_int, default=None, metavar="N",
                       help="train on the first N training images (default: all)")
        add_deprecated_alias(g, "--train-images", "--limit-train", "limit_train", type=positive_int, metavar="N")
    if test:
        g.add_argument("--limit-test", type=positive_int, default=None, metavar="N",
                       help="evaluate on the first N test images (default: all)")
        add_deprecated_alias(g, "--test-images", "--limit-test", "limit_test", type=positive_int, metavar="N")


def add_per_channel_args(g, default: str) -> None:
    """The ``--per-channel`` / ``--per-tensor`` pair (weight grids; ``args.per_channel`` is None when neither is
    given, i.e. the recipe's value). ``default`` says what that is, for the help."""
    m = g.add_mutually_exclusive_group()
    m.add_argument("--per-channel", dest="per_channel", action="store_true", default=None,
                   help=f"one weight grid per output channel (default: {default})")
    m.add_argument("--per-tensor", dest="per_channel", action="store_false", default=None,
                   help="one weight grid per layer")


def add_training_args(g) -> None:
    """The optimiser and schedule flags shared by ``qcnn train`` and ``qcnn qat`` (``TrainSpec`` fields; a flag
    not given keeps the recipe's or the command's default)."""
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--lr", type=float, default=None, help="(peak) learning rate")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default=None, help="optimiser")
    g.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    g.add_argument("--schedule", choices=["constant", "step", "cosine", "onecycle"], default=None,
                   help="learning-rate schedule, stepped after every optimiser step")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=None,
                   help="weight decay of conv / linear kernels (BatchNorm, biases and quantizer parameters: none)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no random crop / flip on the training set")
    g.add_argument("--kernels", choices=["eager", "fused"], default=None,
                   help="quantizer kernels: eager ops, or fused compiled kernels (default: $QCNN_KERNELS, else "
                        "eager; the first fused call compiles, seconds to a minute)")
    g.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="train and evaluate torch.compile(model) (compiles at the first step)")
    g.add_argument("--freeze-bn", dest="freeze_bn", type=float, default=None, metavar="EPOCHS",
                   help="after EPOCHS (fractions allowed; 0: from the start) every BatchNorm uses its "
                        "running statistics and stops updating them (for fine-tuning a trained network; default never)")
    g.add_argument("--grad-clip", dest="grad_clip", type=float, default=None, metavar="NORM",
                   help="clip the global gradient norm to NORM before every step (default: no clipping)")


def add_data_args(p: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=dataset_required,
                   help="mnist, fashion-mnist, cifar10, imagenet or imagefolder (see `qcnn datasets`); "
                        "fashion-detection: the composited detection set (detectors such as yolo_tiny)")
    g.add_argument("--data-dir", default=None, help="dataset folder or archive (default: standard locations)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="training batch size (default: 128)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="auto = cuda if available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")


def add_model_args(p: argparse.ArgumentParser, model_required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=model_required,
                   help="zoo model (see `qcnn models`) or tv:<torchvision name>; optional with a qcnn checkpoint")
    g.add_argument("--checkpoint", "--init", dest="checkpoint", default=None,
                   help="weights to load: a qcnn model.pt (architecture and recipe included) or a state_dict file")
    g.add_argument("--width", type=float, default=1.0, help="width multiplier of the zoo model (default 1)")
    g.add_argument("--num-classes", type=positive_int, default=None, help="classifier outputs (default: the dataset's)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory")
    g.add_argument("--json", action="store_true", help="end with one JSON line of the figures")


def resolve_device(name: str):
    import torch

    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise ValueError(f"--device {name!r} is not one of {DEVICES}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available")
    from qcnn.train import distributed_device

    return distributed_device(name)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data_from_args(args, augment: bool = True, **kw):
    """``qcnn.data.get_data`` from the parsed data arguments; joins torchrun's process group and shards."""
    from qcnn.data import get_data
    from qcnn.data.detection_loaders import detection_bundle, is_detection_set
    from qcnn.train import init_distributed

    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1")
    device = resolve_device(getattr(args, "device", "auto"))
    rank, world = init_distributed(device)
    kw.setdefault("batch_size", args.batch_size or 128)
    if world > 1:
        kw.setdefault("rank", rank)
        kw.setdefault("world_size", world)
    if is_detection_set(args.dataset):
        kw["batch_size"] = args.batch_size or 64
        return detection_bundle(args.dataset, data_dir=args.data_dir, device=device, augment=augment,
                                seed=getattr(args, "seed", 0), **kw)
    return get_data(args.dataset, data_dir=args.data_dir, device=device, augment=augment,
                    seed=getattr(args, "seed", 0), **kw)


def _image_side(bundle) -> int | None:
    size = getattr(bundle, "image_size", None)
    if size is None:
        return None
    return int(size) if isinstance(size, int) else int(tuple(size)[-1])


def load_model_from_args(args, bundle):
    """The model of ``--model`` / ``--checkpoint`` on the bundle's device; returns ``(model, arch)``.

    A qcnn checkpoint (``model.pt``) brings its own architecture and recipe (a quantized checkpoint comes
    back quantized); ``args.checkpoint_info`` then holds its ``info`` dict. Any other weights file is loaded
    into ``--model`` built for the dataset (classes, input channels, image size).
    """
    from qcnn.checkpoint import MODEL_FORMAT, load_checkpoint, load_model
    from qcnn.models import build_model, load_weights, model_accepts

    device = bundle.device if hasattr(bundle, "device") else resolve_device(getattr(args, "device", "auto"))
    args.checkpoint_info = None
    ckpt = getattr(args, "checkpoint", None)
    if ckpt:
        obj = load_checkpoint(ckpt)
        fmt = obj.get("format") if isinstance(obj, dict) else None
        if (isinstance(fmt, str) and fmt.startswith(("qcnn-model/", "qcnn-compressed/"))
                and fmt not in (MODEL_FORMAT, "qcnn-compressed/1")):  # a newer qcnn's file
            raise ValueError(f"checkpoint {ckpt!r} has format {fmt!r}; this version reads {MODEL_FORMAT!r} and "
                             "'qcnn-compressed/1'")
        if fmt == "qcnn-compressed/1":
            from qcnn.compress import load_compressed

            model, info = load_compressed(ckpt, device=device)
            _check_fits(info["arch"], bundle, ckpt)
            args.checkpoint_info = info
            return model, info["arch"]
        if fmt == MODEL_FORMAT:
            if args.model and args.model != obj["arch"]["name"]:
                raise ValueError(f"checkpoint {ckpt!r} holds a {obj['arch']['name']!r} model, not --model "
                                 f"{args.model!r}")
            model, info = load_model(ckpt, device=device)
            arch = info["arch"]
            width = getattr(args, "width", 1.0)
            if width != 1.0 and float(width) != float(arch.get("width", 1.0)):
                raise ValueError(f"--width {width:g} does not apply to checkpoint {ckpt!r}: it holds a "
                                 f"{arch['name']!r} of width {arch.get('width', 1.0):g} (leave --width out)")
            _check_fits(arch, bundle, ckpt)
            args.checkpoint_info = info
            return model, arch
    if not args.model:
        raise ValueError("--model is required (unless --checkpoint is a qcnn model checkpoint)")
    arch = {"name": args.model, "num_classes": args.num_classes or bundle.num_classes,
            "in_channels": bundle.in_channels, "width": args.width, "kwargs": {}}
    side = _image_side(bundle)
    if side is not None and model_accepts(args.model, "image_size"):
        arch["kwargs"]["image_size"] = side
    if args.model.startswith("tv:"):
        model = build_model(args.model, num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                            width=arch["width"], weights=ckpt)
    else:
        model = build_model(args.model, num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                            width=arch["width"], **arch["kwargs"])
        if ckpt:
            load_weights(model, obj, source=f"checkpoint {ckpt!r}")
    return model.to(device), arch


def _check_fits(arch: dict, bundle, ckpt: str) -> None:
    if arch["in_channels"] != bundle.in_channels:
        raise ValueError(f"checkpoint {ckpt!r} expects {arch['in_channels']}-channel input, dataset "
                         f"{bundle.name!r} has {bundle.in_channels}")
    if arch["num_classes"] != bundle.num_classes:
        print(f"note: checkpoint has {arch['num_classes']} classes, dataset {bundle.name!r} has "
              f"{bundle.num_classes}", file=sys.stderr)


#: config keys that may change between a run and its --resume (the training spec: fit warns about it)
_RESUMABLE_CHANGES = ("train", "device")


#: config keys of earlier versions -> their name now (a run written before the rename still resumes)
_RENAMED_KEYS = {"train_images": "limit_train"}


def _comparable(config: dict, ignore: tuple[str, ...] = ()) -> dict:
    c = json.loads(json.dumps(config, default=str))
    for old, new in _RENAMED_KEYS.items():
        if old in c:
            c.setdefault(new, c.pop(old))
    for k in (*_RESUMABLE_CHANGES, *ignore):
        c.pop(k, None)
    if isinstance(c.get("recipe"), dict):
        c["recipe"] = {k: v for k, v in c["recipe"].items() if k != "train"}
    return c


def write_run_config(out: Path | None, resume: bool, config: dict, write: bool = True,
                     ignore: tuple[str, ...] = ()) -> None:
    """Write ``OUT/config.json`` for a training command, without ever losing an earlier run.

    Without ``--resume`` a directory that already holds a run (``last.pt`` or ``model.pt``) is refused. With
    ``--resume`` the saved configuration must match this one (model, data, limits, seed, init, recipe; the
    training spec may change and is reported by the training loop; ``ignore`` names further keys), else the
    mismatch is named and nothing is written. ``write=False`` only checks (a command that writes the
    configuration after training)."""
    if out is None:
        return
    path = out / "config.json"
    if resume:
        if path.is_file():
            try:
                old = _comparable(json.loads(path.read_text()), ignore)
            except json.JSONDecodeError as e:
                raise ValueError(f"--resume: {path} is not valid JSON ({e})") from None
            new = _comparable(config, ignore)
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k)]
            if diff:
                raise ValueError(f"--resume: {out} was run with other settings ({'; '.join(diff)}); resume with "
                                 "the same flags, or train into another --out")
    elif any((out / n).exists() for n in ("last.pt", "model.pt")):
        raise ValueError(f"--out {str(out)!r} already holds a run (last.pt / model.pt): pass --resume to continue "
                         "it, or choose another --out")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, config, default=str)


def _rounded(v):
    if isinstance(v, float):
        return round(v, 4) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def headline(res: dict, prefix: str = "") -> dict:
    """The headline figures of an evaluation result under their names: ``{"top1": ...}`` for a classifier,
    ``{"map_50": ..., "map": ...}`` for a detector (COCO mAP, points); ``prefix`` e.g. ``"float_"``."""
    from qcnn.detection.task import metric_of

    m = metric_of(res)
    keys = (m,) if m == "top1" else (m, "map")
    return {f"{prefix}{k}": res[k] for k in keys}


def finish(args, figures: dict) -> int:
    """Print ``figures`` (one ``key: value`` line each); with ``--json`` the last line is them as JSON.

    Only rank 0 prints under torchrun. With ``--out`` the figures are also written to ``OUT/result.json``.
    """
    from qcnn.train import is_main_process

    figures = _rounded(dict(figures))
    if not is_main_process():
        return 0
    out = getattr(args, "out", None)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_json(Path(out) / "result.json", figures)
    for k, v in figures.items():
        print(f"{k}: {v}")
    if getattr(args, "json", False):
        print(json.dumps(figures), flush=True)
    return 0


__all__ = ["DEVICES", "add_data_args", "add_deprecated_alias", "add_limit_args", "add_model_args", "add_output_args",
           "add_per_channel_args", "add_training_args", "finish", "headline", "load_data_from_args",
           "load_model_from_args", "positive_float", "positive_int", "resolve_device", "seed_everything"]

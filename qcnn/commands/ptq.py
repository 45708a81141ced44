"""``qcnn ptq``: post-training quantization (no training) with QCode fixed point or uniform grids.

BatchNorm is folded into the convolutions, the model is calibrated on the dataset's held-out calibration
split (``--calib-images`` images, never the test set) and, with ``--search``, the QCode fractional lengths
(``greedy``) or the per-layer bit widths (``accuracy``, within ``--max-drop`` points of float on that split)
are searched. Prints the float and quantized test top-1; with ``--out`` writes ``layers.md`` /
``layers.json`` (per-layer bits, grid, weight and activation SQNR, parameters, packed bytes),
``recipe.json`` and ``model.pt``, which ``qcnn eval --checkpoint OUT/model.pt`` evaluates again.

Example::

    qcnn ptq --model resnet20 --checkpoint ../shared/data/weights/resnet20-12fca82f.th --dataset cifar10 \\
        --data-dir ../shared/data/cifar10-jpeg.zip --method qcode --per-tensor --w-bits 8 --a-bits 8 \\
        --calib minmax --first-last same --out runs/ptq_r20
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from qcnn.commands.common import (
    add_data_args,
    add_limit_args,
    add_model_args,
    add_output_args,
    add_per_channel_args,
    finish,
    headline,
    load_data_from_args,
    load_model_from_args,
    positive_int,
    seed_everything,
)
from qcnn.io import write_json


def add_parser(sub) -> None:
    p = sub.add_parser("ptq", help="post-training quantization (calibration and QCode / bit-width search)",
                       description="Quantize a trained float model without training: fold BN, calibrate, "
                                   "optionally search QCode fractional lengths or per-layer bit widths.")
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("quantization (flags override --recipe)")
    g.add_argument("--recipe", default=None,
                   help="a recipe name (qcode, uniform, ...: see `qcnn qat --help`) or the path of a recipe YAML file; "
                        "default: Recipe(method='qcode')")
    g.add_argument("--method", default=None,
                   help="qcode (fixed point; the default without --recipe, as QCode is the survey's post-training "
                        "method) or uniform")
    g.add_argument("--w-bits", type=int, default=None, help="weight bits (default: the recipe's; 8 without --recipe)")
    g.add_argument("--a-bits", type=int, default=None,
                   help="activation bits (default: the recipe's; 8 without --recipe)")
    g.add_argument("--calib", default=None,
                   help="activation range estimator: minmax (default without --recipe), ema, percentile, mse, kl "
                        "(entropy, after-ReLU form), kl_tensorrt (the literal TensorRT form)")
    g.add_argument("--calib-images", type=positive_int, default=None,
                   help="calibration images (default: the recipe's; 1024 without --recipe)")
    g.add_argument("--first-last", choices=["fp32", "8bit", "same"], default=None,
                   help="first/last layer policy (default: the recipe's; 8bit without --recipe)")
    add_per_channel_args(g, "the recipe's; per-channel without --recipe, as Recipe(); QCode's paper form is "
                            "--per-tensor")
    t = p.add_argument_group("post-training steps (recipe ptq: fields of the same names)")
    t.add_argument("--calib-augment", type=int, default=None, metavar="K",
                   help="calibrate every step on the calibration images, their mirror images and K random resized "
                        "crops of each (for a few images and learned rounding; default 0: the images alone)")
    t.add_argument("--equalize", action="store_true", default=None,
                   help="cross-layer equalization + high-bias absorption before calibration (Nagel et al. 2019)")
    t.add_argument("--no-absorb-bias", dest="absorb_bias", action="store_false", default=None,
                   help="with --equalize: skip high-bias absorption")
    t.add_argument("--equalize-relu6", default=None, choices=["clip", "relu", "skip"],
                   help="with --equalize: a ReLU6 between two equalized layers becomes a per-channel clamp (clip, "
                        "default: the function is kept), a ReLU (relu: as Nagel et al.; integer-engine friendly) "
                        "or the pair is left alone (skip)")
    t.add_argument("--pot-align", action="store_true", default=None,
                   help="power-of-two activation grids (QCode): scale each rescalable activation, on the calibration "
                        "images, so that its power-of-two step is its free optimum (after --equalize for ReLU6 nets)")
    t.add_argument("--bias-correction", nargs="?", const="empirical", default=None,
                   choices=["empirical", "analytic"],
                   help="correct each layer's mean output shift (default when given: empirical, on the "
                        "calibration images; analytic: from the BatchNorm statistics where the graph allows)")
    t.add_argument("--round", default=None, choices=["nearest", "adaround", "brecq"],
                   help="weight rounding: nearest (default), adaround (layer-wise learned rounding) or brecq "
                        "(block reconstruction)")
    t.add_argument("--keep-dc", action="store_true", default=None,
                   help="round each spatial kernel so that its sum (its DC gain) stays within half a step of the "
                        "float kernel's, after nearest or learned rounding (depthwise nets: MobileNetV2)")
    t.add_argument("--round-iterations", type=positive_int, default=None,
                   help="learned rounding: optimisation steps per layer / block (default 1000)")
    t.add_argument("--round-drop-prob", type=float, default=None,
                   help="learned rounding: QDrop probability of feeding float activations (default 0: off)")
    t.add_argument("--round-lr", type=float, default=None,
                   help="learned rounding: Adam step of the rounding variables (default max(4e-3, 10 / iterations))")
    t.add_argument("--round-act-lr", type=float, default=None,
                   help="learned rounding: also learn the per-tensor activation steps with this Adam step (BRECQ / "
                        "QDrop use 4e-5; default 0: off)")
    t.add_argument("--mixed-precision", default=None, metavar="SIZE_OR_BOPS_BUDGET",
                   help="per-layer weight bits by measured sensitivity under a budget: size:200KB, size:1.5MiB, "
                        "bops:2G or 0.6x (of the --w-bits model's weight size)")
    t.add_argument("--mp-candidates", default=None, help="mixed precision: weight bits to choose from (default 8,6,4)")
    s = p.add_argument_group("search")
    s.add_argument("--search", choices=["none", "greedy", "accuracy"], default="none",
                   help="greedy: QCode fl window search; accuracy: per-layer bit widths within --max-drop")
    s.add_argument("--metric", choices=["mse", "kl"], default="mse", help="error the fl search minimises")
    s.add_argument("--window", type=int, default=3, help="fl search window +-W around the initial fl")
    s.add_argument("--max-drop", type=float, default=0.5, help="accuracy search: allowed top-1 drop (points)")
    s.add_argument("--bit-candidates", default="8,6,5,4", help="accuracy search: bit widths to try")
    s.add_argument("--eval-images", type=positive_int, default=2000,
                   help="accuracy search: calibration-split images that score a configuration")
    add_limit_args(p, train=False)
    add_output_args(p)
    p.set_defaults(func=run)


def recipe_from_args(args):
    from qcnn.recipes import Recipe, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else Recipe(method="qcode")
    ptq = {"calib_augment": args.calib_augment, "equalize": args.equalize, "absorb_bias": args.absorb_bias,
           "equalize_relu6": args.equalize_relu6,
           "pot_align": args.pot_align, "bias_correction": args.bias_correction,
           "round": args.round, "keep_dc": args.keep_dc, "round_iterations": args.round_iterations,
           "round_drop_prob": args.round_drop_prob,
           "round_act_lr": args.round_act_lr, "round_lr": args.round_lr,
           "mixed_precision": args.mixed_precision,
           "mp_candidates": list(_bits_list(args.mp_candidates, "--mp-candidates")) if args.mp_candidates else None}
    return recipe.replace(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, calib=args.calib,
                          calib_images=args.calib_images, first_last=args.first_last, per_channel=args.per_channel,
                          fold_bn=True, ptq={k: v for k, v in ptq.items() if v is not None})


def _bits_list(text: str, flag: str = "--bit-candidates") -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers") from None


def _write_mixed_precision(mp, out: Path, model: str) -> None:
    """``mixed_precision.md`` (bits per layer, sensitivities), ``mixed_precision.json`` and ``pareto.png``."""
    import dataclasses

    from qcnn.io import write_text
    from qcnn.report.pareto import bits_table_md, plot_pareto

    write_text(out / "mixed_precision.md", bits_table_md(mp))
    write_json(out / "mixed_precision.json", dataclasses.asdict(mp), indent=1)
    plot_pareto(mp, out / "pareto.png", title=f"{model}: mixed precision under {mp.budget_kind} budget")


def _check_early(args, recipe) -> None:
    """Refuse a bad method, option, budget, estimator or search flag before any data is loaded."""
    from qcnn.calib.observers import make_observer
    from qcnn.methods.base import get_method

    get_method(recipe.method, recipe.params)
    if recipe.ptq.mixed_precision:
        from qcnn.methods.mixed_precision import parse_budget

        parse_budget(recipe.ptq.mixed_precision)
    import qcnn.calib.histogram  # noqa: F401 - registers percentile / mse / kl

    make_observer(recipe.calib)
    if recipe.calib_images < 1:
        raise ValueError(f"calib_images={recipe.calib_images!r} must be >= 1 (--calib-images)")
    if args.window < 0:
        raise ValueError(f"--window {args.window!r} must be >= 0")
    if args.max_drop < 0:
        raise ValueError(f"--max-drop {args.max_drop!r} must be >= 0")


def run(args) -> int:
    from qcnn.checkpoint import save_model
    from qcnn.data import subset
    from qcnn.detection.task import metric_of
    from qcnn.methods.ptq import post_training_quantize
    from qcnn.report.layers import layer_table, write_layer_table
    from qcnn.report.size import summarize
    from qcnn.train import evaluate, progress_line

    t0 = time.time()
    seed_everything(args.seed)
    recipe = recipe_from_args(args)
    _check_early(args, recipe)
    bits = _bits_list(args.bit_candidates)
    calib_size = max(recipe.calib_images, args.eval_images if args.search == "accuracy" else 0)
    bundle = load_data_from_args(args, augment=False, calib_size=0)
    n_train = bundle.train.num_samples
    if calib_size > n_train:
        flag = "--calib-images" if calib_size == recipe.calib_images else "--eval-images"
        raise ValueError(f"{flag} {calib_size} asks for more images than the {n_train} training images of dataset "
                         f"{bundle.name!r}")
    if calib_size == n_train:  # every training image calibrates (augment=False: the split as stored, shuffled)
        bundle.calib = bundle.train
    else:  # the held-out tail of the training split (a split smaller than the training set: get_data's rule)
        bundle = load_data_from_args(args, augment=False, calib_size=calib_size)
    if args.limit_test is not None:
        if args.limit_test < 1:
            raise ValueError(f"--limit-test {args.limit_test} must be >= 1")
        bundle.test = subset(bundle.test, args.limit_test)
    model, arch = load_model_from_args(args, bundle)
    if getattr(args, "checkpoint_info", None) and args.checkpoint_info.get("recipe"):
        raise ValueError(f"checkpoint {args.checkpoint!r} is already quantized; ptq needs a float model")
    model.eval()
    float_res = evaluate(model, bundle.test)
    m = metric_of(float_res)
    # the accuracy search reports every trial; otherwise each step (calibration included) is a progress line
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.search == "accuracy" else progress_line
    progress_line(f"float test {m} {float_res[m]:.2f}; quantizing ({recipe.method} W{recipe.w_bits}"
                  f"A{recipe.a_bits or 'fp'}) and calibrating on {recipe.calib_images} images")
    res = post_training_quantize(model, recipe, bundle.calib, search=args.search, metric=args.metric,
                                 max_drop=args.max_drop, bit_candidates=bits, window=args.window,
                                 eval_images=args.eval_images, log=log)
    qmodel, recipe = res.model, res.recipe
    res_q = evaluate(qmodel, bundle.test)
    batch = next(iter(bundle.calib))[0]
    size = summarize(qmodel, batch[:1])
    figures = {"method": recipe.method, "w_bits": recipe.w_bits, "a_bits": recipe.a_bits, "calib": recipe.calib,
               "search": args.search, "first_last": recipe.first_last, "per_channel": recipe.per_channel,
               **headline(float_res, "float_"), **headline(res_q), "drop": float_res[m] - res_q[m],
               "size_bytes": size["size_bytes"], "bops": size["bops"]}
    figures["ptq_steps"] = recipe.ptq.steps
    figures["ptq_step_details"] = res.ptq_steps
    if args.search == "accuracy":
        figures["calib_float_top1"] = res.float_calib_top1
        figures["calib_top1"] = res.calib_top1
        figures["calib_drop"] = res.float_calib_top1 - res.calib_top1  # held-out split vs test set ("drop")
        figures["weight_bits_total"] = sum(r["params"] * r["w_bits"] for r in size["layers"])
    if args.out:
        out = Path(args.out)
        rows = layer_table(qmodel, batch)
        write_layer_table(rows, out)
        write_json(out / "recipe.json", recipe.to_dict())
        if res.steps:
            write_json(out / "search.json", res.steps, indent=1)
        if res.mixed_precision is not None:
            _write_mixed_precision(res.mixed_precision, out, args.model)
        save_model(out / "model.pt", qmodel, arch, recipe=recipe, metrics={**figures, "dataset": args.dataset})
        figures["model"] = str(out / "model.pt")
        figures["layers"] = str(out / "layers.md")
    figures["seconds"] = round(time.time() - t0, 1)
    return finish(args, figures)

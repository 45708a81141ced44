"""``qcnn qat``: quantization-aware training of a float model with a recipe.

The recipe (``--recipe pact``: a recipe name, or the path of a YAML file; default: uniform 8-bit) names the
method and, through ``procedure``, the training procedure; :func:`qcnn.methods.run_recipe` does the work, so
every method and procedure is served the same way. Flags override recipe fields. Prints the float (init) and quantized
top-1; with ``--out`` writes ``config.json``, the training logs and ``model.pt`` (architecture + recipe +
quantized state), which ``qcnn eval --checkpoint OUT/model.pt`` evaluates with the same quantized forward.
A quantized ``--init`` checkpoint is trained further with its own recipe (training flags still apply).
"""

from __future__ import annotations

import time
from pathlib import Path

from qcnn.commands.common import (
    add_data_args,
    add_limit_args,
    add_model_args,
    add_output_args,
    add_per_channel_args,
    add_training_args,
    finish,
    headline,
    load_data_from_args,
    load_model_from_args,
    seed_everything,
    write_run_config,
)
from qcnn.io import write_json
from qcnn.models import arch_record
from qcnn.recipes import list_recipes

#: flag -> TrainSpec field
_TRAIN_FLAGS = ("epochs", "lr", "optimizer", "momentum", "schedule", "weight_decay", "batch_size", "augment",
                "kernels", "compile", "freeze_bn", "grad_clip")


def add_parser(sub) -> None:
    p = sub.add_parser("qat", help="quantization-aware training with a recipe",
                       description="Quantize a float model with a recipe and train it (QAT or the recipe's "
                                   "procedure: two_step, progressive, guided, ...).")
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("recipe (flags override the recipe)")
    g.add_argument("--recipe", default=None,
                   help=f"a recipe name ({', '.join(list_recipes())}), or the path of a recipe YAML file; "
                        "default: Recipe(), uniform W8A8")
    g.add_argument("--method", default=None, help="quantization method (default: the recipe's)")
    g.add_argument("--procedure", default=None, help="training procedure (two_step, progressive, guided, ...)")
    g.add_argument("--w-bits", type=int, default=None, help="weight bits (default: the recipe's)")
    g.add_argument("--a-bits", type=int, default=None, help="activation bits (default: the recipe's)")
    g.add_argument("--g-bits", type=int, default=None, help="gradient bits (DoReFa G, WAGE G)")
    g.add_argument("--e-bits", type=int, default=None, help="error bits (WAGE E)")
    g.add_argument("--first-last", choices=["fp32", "8bit", "same"], default=None,
                   help="first/last layer policy (default: the recipe's)")
    g.add_argument("--calib", default=None, help="activation range estimator (minmax, ema, percentile, mse, kl)")
    add_per_channel_args(g, "the recipe's; per-channel without --recipe, as Recipe()")
    t = p.add_argument_group("training (flags override the recipe's train: mapping)")
    add_training_args(t)
    add_limit_args(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_output_args(p)
    p.set_defaults(func=run)


def recipe_from_args(args, base=None):
    """The recipe of ``--recipe`` (or ``base``) with the flags applied."""
    from qcnn.recipes import Recipe, load_recipe

    recipe = base if base is not None else (load_recipe(args.recipe) if args.recipe else Recipe())
    train = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k, None) is not None}
    fields = {k: getattr(args, k, None) for k in ("method", "procedure", "w_bits", "a_bits", "g_bits", "e_bits",
                                                   "first_last", "calib", "per_channel")}
    if base is not None:
        fields = {}
    return recipe.replace(**fields, train=train)


def run(args) -> int:
    from qcnn.checkpoint import save_model
    from qcnn.data import subset
    from qcnn.detection.task import metric_of
    from qcnn.methods import run_recipe, train_quantized
    from qcnn.recipes import Recipe
    from qcnn.train import check_spec, evaluate, is_main_process, progress_line

    t0 = time.time()
    seed_everything(args.seed)
    recipe = recipe_from_args(args)
    check_spec(recipe.train)  # a bad training spec fails before data is loaded and the model calibrated
    args.batch_size = recipe.train.batch_size
    bundle = load_data_from_args(args, augment=recipe.train.augment)
    for flag, split in (("limit_train", "train"), ("limit_test", "test")):
        n = getattr(args, flag)
        if n is not None:
            if n < 1:
                raise ValueError(f"--{flag.replace('_', '-')} {n} must be >= 1")
            setattr(bundle, split, subset(getattr(bundle, split), n))
    if args.resume and not args.out:
        raise ValueError("--resume needs --out (the run directory)")
    model, arch = load_model_from_args(args, bundle)
    info = getattr(args, "checkpoint_info", None)
    out = Path(args.out) if args.out else None

    def config_of(recipe, arch):
        return {"model": arch, "dataset": args.dataset, "data_dir": args.data_dir, "init": args.checkpoint,
                "seed": args.seed, "limit_train": args.limit_train, "limit_test": args.limit_test,
                "recipe": recipe.to_dict()}

    if info and info.get("recipe"):  # continue training a quantized checkpoint with its own recipe
        recipe = recipe_from_args(args, base=Recipe.from_dict(info["recipe"], where="checkpoint recipe"))
        if is_main_process():  # refuse to overwrite an earlier run, or to resume one with other settings
            write_run_config(out, args.resume, config_of(recipe, arch), write=False, ignore=("model",))
        float_res = None
        qmodel = model.train()
        metrics = train_quantized(qmodel, bundle, recipe, out, args.resume)
    else:
        if is_main_process():
            write_run_config(out, args.resume, config_of(recipe, arch), write=False, ignore=("model",))
        float_res = evaluate(model, bundle.test)
        m = metric_of(float_res)
        progress_line(f"float test {m} {float_res[m]:.2f}; quantizing ({recipe.method} W{recipe.w_bits}"
                      f"A{recipe.a_bits or 'fp'}) and calibrating on {recipe.calib_images} images")
        qmodel, metrics = run_recipe(model, bundle, recipe, out, args.resume)
        arch = arch_record(qmodel) or arch  # WAGE / Bi-Real train another network than the one passed in
    if out is not None and is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config_of(recipe, arch), default=str)
    res = evaluate(qmodel, bundle.test)
    m = metric_of(res)
    figures = {"method": recipe.method, "procedure": recipe.procedure, "w_bits": recipe.w_bits,
               "a_bits": recipe.a_bits, "first_last": recipe.first_last, "epochs": recipe.train.epochs,
               **headline(res), **(headline(float_res, "float_") if float_res else {f"float_{m}": None}),
               "drop": None if float_res is None else float_res[m] - res[m],
               "seconds": round(time.time() - t0, 1)}
    if out is not None and is_main_process():
        extra = {k: v for k, v in metrics.items() if k not in ("top1", "loss", "map_50", "map", "map_75", "metric")}
        save_model(out / "model.pt", qmodel, arch, recipe=recipe,
                   metrics={**figures, "dataset": args.dataset, **extra})
        figures["model"] = str(out / "model.pt")
    return finish(args, figures)

"""Post-training steps, one at a time: nearest rounding, + cross-layer equalization, + bias correction,
+ AdaRound, + BRECQ, on a CIFAR ResNet (full test set) or MobileNetV2 (the 20 foolbox ImageNet samples).

Every cell is one :func:`qcnn.methods.ptq.post_training_quantize` run with all layers quantized (first and
last included, ``first_last=same``), BN folded, no retraining, and records the quality and the CPU seconds
of the PTQ steps (process time, both cores). CIFAR: top-1 on the test set and its drop from float;
calibration on the held-out tail of the training split. MobileNetV2: two folds (calibrate on the even
images, evaluate the odd ones and vice versa), logit SQNR against float and top-1 agreement (see
``benchmarks/mobilenet_ptq.py`` for the images).

    python benchmarks/ptq_steps.py --model resnet20 --out benchmarks/results
    python benchmarks/ptq_steps.py --model resnet56 --weights ../shared/data/weights/resnet56-4bfd9763.th
    python benchmarks/ptq_steps.py --model tv:mobilenet_v2 --images .data/imagenet_samples
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from qcnn.io import write_json, write_text
from qcnn.methods.ptq import post_training_quantize
from qcnn.models import build_model, load_weights
from qcnn.recipes import Recipe
from qcnn.report.layers import sqnr_db

#: (name, recipe fields) of the grids compared
CONFIGS = {
    "qcode-pt-8/8": dict(method="qcode", per_channel=False, w_bits=8, a_bits=8, calib="mse"),
    "qcode-pt-8/8-unsigned": dict(method="qcode", per_channel=False, w_bits=8, a_bits=8, calib="mse",
                                  params={"unsigned_acts": True}),
    "qcode-pt-8/8-unsigned-kl": dict(method="qcode", per_channel=False, w_bits=8, a_bits=8, calib="kl",
                                     params={"unsigned_acts": True}),
    "qcode-pt-8/8-unsigned-percentile": dict(method="qcode", per_channel=False, w_bits=8, a_bits=8,
                                             calib="percentile", params={"unsigned_acts": True}),
    "qcode-pc-4/8": dict(method="qcode", per_channel=True, w_bits=4, a_bits=8, calib="mse"),
    "uniform-pc-4/8": dict(method="uniform", per_channel=True, w_bits=4, a_bits=8, calib="mse",
                           params={"weight_range": "mse"}),
    "uniform-pc-4/8-minmax": dict(method="uniform", per_channel=True, w_bits=4, a_bits=8, calib="mse"),
    "uniform-pc-4/4": dict(method="uniform", per_channel=True, w_bits=4, a_bits=4, calib="mse",
                           params={"weight_range": "mse"}),
    "uniform-pc-8/8": dict(method="uniform", per_channel=True, w_bits=8, a_bits=8, calib="mse"),
}
#: the steps of each column (``+cle``: cross-layer equalization with high-bias absorption; ``+bc``: empirical
#: bias correction; ``+pot``: power-of-two activation alignment; ``+adaround`` layer-wise, ``+brecq`` block-wise
#: learned rounding; ``+qdrop``: BRECQ with QDrop's activation dropping, probability 0.5; ``+act``: the
#: activation steps learned with it, Adam step ``--act-lr``; ``+dc``: each spatial kernel's sum kept through the
#: rounding, ``keep_dc``; ``+aug2``: the calibration images, their mirror images and 2 random resized crops of each,
#: ``calib_augment: 2``)
STEPS = {
    "nearest": {},
    "+cle": {"equalize": True},
    "+bc": {"bias_correction": "empirical"},
    "+cle+bc": {"equalize": True, "bias_correction": "empirical"},
    "+cle+pot+bc": {"equalize": True, "pot_align": True, "bias_correction": "empirical"},
    "+cle+pot+adaround+bc": {"equalize": True, "pot_align": True, "round": "adaround", "bias_correction": "empirical"},
    "+pot+bc": {"pot_align": True, "bias_correction": "empirical"},
    "+adaround": {"round": "adaround"},
    "+adaround+bc": {"round": "adaround", "bias_correction": "empirical"},
    "+cle+adaround+bc": {"equalize": True, "round": "adaround", "bias_correction": "empirical"},
    "+brecq": {"round": "brecq"},
    "+brecq+bc": {"round": "brecq", "bias_correction": "empirical"},
    "+cle+brecq+bc": {"equalize": True, "round": "brecq", "bias_correction": "empirical"},
    "+qdrop+bc": {"round": "brecq", "round_drop_prob": 0.5, "bias_correction": "empirical"},
    "+dc": {"keep_dc": True},
    "+dc+bc": {"keep_dc": True, "bias_correction": "empirical"},
    "+cle+dc+bc": {"equalize": True, "keep_dc": True, "bias_correction": "empirical"},
    "+cle+pot+dc+bc": {"equalize": True, "pot_align": True, "keep_dc": True, "bias_correction": "empirical"},
    "+adaround+dc": {"round": "adaround", "keep_dc": True},
    "+brecq+dc": {"round": "brecq", "keep_dc": True},
    "+brecq+dc+bc": {"round": "brecq", "keep_dc": True, "bias_correction": "empirical"},
    "+adaround+dc+aug2": {"round": "adaround", "keep_dc": True, "calib_augment": 2},
    "+brecq+dc+aug2": {"round": "brecq", "keep_dc": True, "calib_augment": 2},
    "+adaround+act+bc": {"round": "adaround", "round_act_lr": None, "bias_correction": "empirical"},
    "+brecq+act+bc": {"round": "brecq", "round_act_lr": None, "bias_correction": "empirical"},
}
#: learned-rounding steps per layer / block; a run with another count labels its column with it
DEFAULT_ITERATIONS = 1000
#: Adam step of the learned activation steps (``+act``); another value labels its column with it
DEFAULT_ACT_LR = 1e-4
WEIGHTS = {"resnet20": "../shared/data/weights/resnet20-12fca82f.th",
           "resnet56": "../shared/data/weights/resnet56-4bfd9763.th",
           "tv:mobilenet_v2": "../shared/data/weights/mobilenet_v2-b0353104.pth"}


def _cifar(args):
    from qcnn.data import get_data, subset
    from qcnn.train import evaluate

    bundle = get_data("cifar10", data_dir=args.data_dir, batch_size=256, augment=False,
                      calib_size=args.calib_images)
    test = subset(bundle.test, args.limit_test) if args.limit_test else bundle.test
    model = load_weights(build_model(args.model), args.weights).eval()
    float_top1 = evaluate(model, test)["top1"]

    def score(recipe):
        res = post_training_quantize(model, recipe, bundle.calib)
        top1 = evaluate(res.model, test)["top1"]
        return {"top1": top1, "drop": float_top1 - top1}, [res.ptq_steps]

    return {"float_top1": float_top1, "test_images": test.num_samples}, score


def _imagenet(args):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mobilenet_ptq import load_images

    x, y = load_images(args.images)
    model = load_weights(build_model(args.model, num_classes=1000), args.weights).eval()
    with torch.no_grad():
        ref = model(x)

    def score(recipe):
        logits, details = torch.empty_like(ref), []
        for fold in (0, 1):
            c, e = torch.arange(fold, len(x), 2), torch.arange(1 - fold, len(x), 2)
            rec = recipe.replace(calib_images=len(c))
            res = post_training_quantize(model, rec, [(x[c], y[c])])
            details.append(res.ptq_steps)
            with torch.no_grad():
                logits[e] = res.model(x[e])
        return {"logit_sqnr_db": sqnr_db(ref, logits),
                "top1_agreement": 100.0 * float((logits.argmax(1) == ref.argmax(1)).float().mean())}, details

    return {"float_top1": 100.0 * float((ref.argmax(1) == y).float().mean()), "images": len(x)}, score


def _merge(path: Path, rows: list[dict], head: dict) -> list[dict]:
    """``rows`` added to those already in ``path`` (same model and data), a cell measured again replacing its
    earlier row, so that the table can be filled in several runs."""
    if not path.is_file():
        return rows
    old = json.loads(path.read_text())
    if any(old.get(k) != v for k, v in head.items()):
        return rows  # another float reference (test slice, images): start a new table
    new = {(r["config"], r["steps"]) for r in rows}
    return [r for r in old["rows"] if (r["config"], r["steps"]) not in new] + rows


def _total(details: dict, key: str) -> float:
    """Seconds of the PTQ steps of one run (the quantize and calibrate steps included)."""
    return round(sum(v[key] for v in details.values()), 2)


def _markdown(result: dict) -> str:
    key = "drop" if "drop" in result["rows"][0] else "logit_sqnr_db"
    unit = "top-1 drop (points), CPU s" if key == "drop" else "logit SQNR dB / top-1 agreement %, CPU s"
    steps = list(dict.fromkeys(r["steps"] for r in result["rows"]))
    md = [f"# PTQ steps on {result['model']}", "",
          f"{result['date']}, {result['machine']}; float top-1 {result['float_top1']:.2f}; all layers quantized "
          f"(first/last included), BN folded, no retraining. Cells: {unit} of the PTQ steps (wall-clock "
          f"seconds in the JSON; MobileNetV2: both folds).", "",
          "| grid | " + " | ".join(steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for cfg in dict.fromkeys(r["config"] for r in result["rows"]):
        cells = []
        for st in steps:
            r = next((r for r in result["rows"] if r["config"] == cfg and r["steps"] == st), None)
            if r is None:
                cells.append("-")
            elif key == "drop":
                cells.append(f"{r['drop']:.2f} ({r['cpu_seconds']:.0f} s)")
            else:
                cells.append(f"{r['logit_sqnr_db']:.2f} / {r['top1_agreement']:.0f} ({r['cpu_seconds']:.0f} s)")
        md.append(f"| {cfg} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=sorted(WEIGHTS))
    p.add_argument("--weights", default=None, help="float weights (default: the shared file for --model)")
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg.zip")
    p.add_argument("--images", default=".data/imagenet_samples", help="MobileNetV2: the foolbox samples")
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--calib-images", type=int, default=1024)
    p.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                   help="learned rounding steps per layer / block")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam step of the rounding variables (default: adaround's, max(4e-3, 10 / iterations))")
    p.add_argument("--act-lr", type=float, default=DEFAULT_ACT_LR, help="Adam step of the activation steps (+act)")
    p.add_argument("--configs", default=None, help="comma-separated subset of " + ",".join(CONFIGS))
    p.add_argument("--steps", default=None, help="comma-separated subset of " + ",".join(STEPS))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.weights = args.weights or WEIGHTS[args.model]
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    steps = args.steps.split(",") if args.steps else list(STEPS)
    for name, table in (("config", CONFIGS), ("step", STEPS)):
        bad = [c for c in (configs if name == "config" else steps) if c not in table]
        if bad:
            raise SystemExit(f"unknown {name}(s) {bad}; choose from {list(table)}")
    head, score = (_imagenet if args.model.startswith("tv:") else _cifar)(args)
    out, tag = Path(args.out), args.model.replace("tv:", "")
    for cfg in configs:
        for st in steps:
            spec = {k: (args.act_lr if k == "round_act_lr" else v) for k, v in STEPS[st].items()}
            lr = args.lr if "round" in spec else None
            recipe = Recipe(**CONFIGS[cfg], first_last="same", calib_images=args.calib_images,
                            ptq={"round_iterations": args.iterations, **spec, "round_lr": lr})
            figures, details = score(recipe)
            notes = [f"{args.iterations} it"] if "round" in spec and args.iterations != DEFAULT_ITERATIONS else []
            notes += [f"lr {lr:g}"] if lr else []
            notes += [f"act lr {args.act_lr:g}"] if "round_act_lr" in spec and args.act_lr != DEFAULT_ACT_LR else []
            label = f"{st} ({', '.join(notes)})" if notes else st
            row = {"config": cfg, "steps": label, "recipe": recipe.to_dict(), **figures,
                   "cpu_seconds": sum(_total(d, "cpu_seconds") for d in details),
                   "seconds": sum(_total(d, "seconds") for d in details), "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "step_details": details}
            print(json.dumps({k: v for k, v in row.items() if k not in ("recipe", "step_details")}), flush=True)
            result = {"model": args.model, **head, "rows": _merge(out / f"ptq_steps_{tag}.json", [row], head),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                      "machine": "CPU (threads and date of each cell in the JSON rows, where recorded)"}
            write_json(out / f"ptq_steps_{tag}.json", result, indent=1)  # after every cell: nothing is lost
            write_text(out / f"ptq_steps_{tag}.md", _markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``qcnn bench``: the equal-bit-width comparison (see :mod:`qcnn.bench`)."""

from __future__ import annotations

import time

from qcnn.commands.common import add_deprecated_alias, positive_float, positive_int


def add_parser(sub) -> None:
    from qcnn.bench import SUITES

    p = sub.add_parser("bench", help="equal-bit-width benchmark of every method (resumable)")
    p.add_argument("--suite", default="quick", choices=sorted(SUITES),
                   help="demo/quick: LeNet-5 on Fashion-MNIST (CPU); cifar10: ResNet-20 on CIFAR-10 (GPU); "
                        "detection: the YOLO-style yolo_tiny on the composited Fashion-MNIST detection set (mAP); "
                        "detection-ssd: torchvision's SSDlite (MobileNetV3) on it")
    p.add_argument("--methods", default=None, help="comma-separated recipe names (default: the suite's)")
    p.add_argument("--bits", default=None, help="comma-separated W/A cells, e.g. 8/8,4/4,2/2,1/2,2/fp")
    p.add_argument("--first-last", default=None, choices=["fp32", "8bit", "same"],
                   help="first/last layer policy of every cell (default: the suite's)")
    p.add_argument("--epochs", type=int, default=None, help="QAT epochs per cell (default: the suite's)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate of every QAT cell and of the fine-tuned float reference (default: the suite's, "
                        "else each recipe's)")
    p.add_argument("--limit-train", type=positive_int, default=None, metavar="N",
                   help="QAT cells train on the first N training images (default: the suite's)")
    add_deprecated_alias(p, "--train-images", "--limit-train", "limit_train", type=positive_int, metavar="N")
    p.add_argument("--init", default=None, help="float checkpoint to start from (default: train one)")
    p.add_argument("--data-dir", default=None, help="dataset folder or archive (default: standard locations)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the float model and of every cell")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="cells run at once, each in its own process (several share one GPU well); default 1")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads per worker process (default: CPU cores / workers)")
    p.add_argument("--time-limit", type=positive_float, default=None,
                   help="seconds after which no new cell starts (the rest stay pending for a later run)")
    p.add_argument("--out", required=True, help="output directory (results.json, tables, plots, cells/); resumable")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses
    import json

    import torch

    from qcnn.bench import SUITES, Bench, parse_bits, results_table

    if args.epochs is not None and args.epochs < 0:
        raise ValueError(f"--epochs {args.epochs} must be >= 0 (0: post-training calibration only)")
    suite = SUITES[args.suite]
    changes = {k: v for k, v in {"first_last": args.first_last, "epochs": args.epochs,
                                 "train_images": args.limit_train}.items() if v is not None}
    if args.lr is not None:
        changes["qat_train"] = {**suite.qat_train, "lr": args.lr}
    suite = dataclasses.replace(suite, **changes)
    methods = args.methods.split(",") if args.methods else None
    bits = args.bits.split(",") if args.bits else None
    for b in bits or []:
        parse_bits(b)
    if methods:
        from qcnn.recipes import list_recipes

        unknown = [m for m in methods if m not in list_recipes()]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown} in --methods; known recipes: {list_recipes()}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    t0 = time.time()
    bench = Bench(suite, args.out, data_dir=args.data_dir, device=device, init=args.init, seed=args.seed,
                  workers=args.workers, threads=args.threads, time_limit=args.time_limit)
    results = bench.run(methods, bits)
    print(results_table(results))
    print(f"wrote {args.out}/results.json, results.md, accuracy_vs_bits.png, accuracy_vs_size.png")
    if args.json:
        m = suite.metric
        ok = {k: round(c[m], 2) for k, c in results["cells"].items() if c["status"] == "ok"}
        print(json.dumps({f"float_{m}": round(results["float"][m], 2), "cells": ok,
                          "seconds": round(time.time() - t0, 1)}))
    return 0

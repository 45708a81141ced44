"""``qcnn models``: list the model zoo."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the model zoo")
    p.add_argument("--json", action="store_true", help="print the list as one JSON line")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from qcnn.models import MODELS, list_models

    names = list_models()
    if args.json:
        print(json.dumps({"models": names, "torchvision": "tv:<name>"}))
        return 0
    for n in names:
        doc = (MODELS[n].__doc__ or "").strip().splitlines()
        print(f"{n:12s} {doc[0] if doc else ''}")
    print("tv:<name>    any torchvision classifier, e.g. tv:resnet18, tv:mobilenet_v2 "
          "(weights from a local file with --checkpoint)")
    return 0

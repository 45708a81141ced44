"""QAT of LeNet-5 on Fashion-MNIST from a float checkpoint with every QAT-I method (first/last 8-bit).

Each cell is one ``qcnn qat`` run (the recipe in ``recipes/<method>.yaml`` with the bits overridden);
results go to ``benchmarks/results/qat_lenet.{json,md}``.

    python benchmarks/qat_lenet.py --init runs/float_lenet5/model.pt --epochs 1
    python benchmarks/qat_lenet.py --init runs/float_lenet5/model.pt --cells pact:4:4 lsq:2:2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CELLS = [f"{m}:4:4" for m in ("dorefa", "pact", "wrpn", "hwgq", "lsq")] + \
                [f"{m}:2:2" for m in ("dorefa", "pact", "wrpn", "hwgq", "lsq")] + ["hwgq:1:2"]


def run_cell(cell: str, args) -> dict:
    from qcnn.cli import main

    recipe, w, a = cell.split(":")
    out = Path(args.runs) / f"{recipe}_w{w}a{a}"
    argv = ["qat", "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"), "--model", "lenet5",
            "--dataset", "fashion-mnist", "--init", args.init, "--w-bits", w, "--a-bits", a,
            "--first-last", "8bit", "--epochs", str(args.epochs), "--out", str(out), "--seed", str(args.seed)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if args.limit_train:
        argv += ["--limit-train", str(args.limit_train)]
    t0 = time.time()
    rc = main(argv)
    if rc != 0:
        return {"cell": cell, "error": f"qcnn qat exited with {rc}"}
    res = json.loads((out / "result.json").read_text())
    res.update(cell=cell, recipe=recipe, wall_seconds=round(time.time() - t0, 1), command="qcnn " + " ".join(argv),
               limit_train=args.limit_train, train_epochs=args.epochs)
    return res


def _key(r: dict) -> tuple:
    return r["cell"], r.get("limit_train"), r.get("train_epochs")


def write(results: list[dict], args) -> None:
    """Merge ``results`` into benchmarks/results/qat_lenet.{json,md} (same cell and budget: replaced)."""
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "qat_lenet.json"
    old = json.loads(path.read_text())["results"] if path.is_file() else []
    new = {_key(r): r for r in results}
    merged = [r for r in old if _key(r) not in new] + results
    meta = {"model": "lenet5", "dataset": "fashion-mnist", "init": args.init, "first_last": "8bit",
            "results": merged}
    path.write_text(json.dumps(meta, indent=2) + "\n")
    lines = [f"# QAT LeNet-5 / Fashion-MNIST (from `{args.init}`, first/last 8-bit)", "",
             "| recipe | W/A | training images x epochs | float top-1 | quantized top-1 | drop | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in merged:
        if "error" in r:
            lines.append(f"| {r['cell']} | | | | {r['error']} | | |")
            continue
        budget = f"{r.get('limit_train') or 60000} x {r.get('train_epochs', r.get('epochs'))}"
        lines.append(f"| {r['recipe']} | W{r['w_bits']}A{r['a_bits']} | {budget} | {r['float_top1']:.2f} "
                     f"| {r['top1']:.2f} | {r['drop']:.2f} | {r['wall_seconds']:.0f} |")
    (out / "qat_lenet.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="runs/float_lenet5/model.pt")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--cells", nargs="*", default=DEFAULT_CELLS, help="recipe:w_bits:a_bits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="runs/qat_lenet")
    args = p.parse_args(argv)
    results = []
    for cell in args.cells:
        results.append(run_cell(cell, args))
        write(results, args)
        print(json.dumps(results[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

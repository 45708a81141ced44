"""Equal-bit-width benchmark: every method x bit-width cell from the same float checkpoint, same budget.

A suite fixes the model, the dataset and the training budget of every quantization-aware cell (epochs and
number of training images); post-training methods (recipes with ``train.epochs: 0``) only calibrate.
Each cell starts from the same float checkpoint, is trained with its recipe (``recipes/<name>.yaml``)
at the cell's bits and evaluated on the full test set. A float model fine-tuned with the same budget is
the reference every drop is measured against.

Cells a method does not define (e.g. a weight-only method at 4/4, Bi-Real at 4/4) are recorded as
``undefined`` with the reason, never run or faked. Results are written after every cell
(``results.json``, atomically) so an interrupted run resumes where it stopped; finished cells are
skipped. ``results.md`` holds the table; ``accuracy_vs_bits.png`` and ``accuracy_vs_size.png`` the plots.

Bits are written ``W/A``; ``A = fp`` keeps activations in float (``a_bits: null``: the method's weight
quantizer alone; residual adds stay float too). Methods whose activations are quantized by design
(WAGE, Bi-Real, FQN) do not define ``A = fp``.

Parallel cells (``workers > 1``): the cells, and the fine-tuned float reference, run in that many
processes (``spawn``), each with ``threads`` intra-op threads; the parent alone writes ``results.json``, as
each cell finishes. Small nets leave a large GPU mostly idle, so several cells share it well. With
``time_limit`` no cell starts after that many seconds; the cells left are pending, and a later run with the
same ``out_dir`` resumes them.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qcnn.checkpoint import save_atomic, save_model
from qcnn.detection.task import metric_of
from qcnn.io import write_text
from qcnn.methods.base import get_method
from qcnn.models import arch_record, build_model, load_weights
from qcnn.recipes import load_recipe
from qcnn.train import evaluate


@dataclass
class Suite:
    name: str
    model: str
    dataset: str
    methods: list[str]
    bits: list[str]
    epochs: int
    train_images: int | None = None  #: None = the whole training set
    float_epochs: int = 3
    float_recipe: dict = field(default_factory=dict)
    first_last: str = "8bit"
    batch_size: int = 128
    metric: str = "top1"  #: the headline figure of every cell: top1 (classifiers) or map_50 (detectors, points)
    qat_train: dict = field(default_factory=dict)  #: TrainSpec fields every QAT cell (and the reference) uses


_FAST = ["qcode", "uniform", "uniform_qat", "dorefa", "pact", "lsq", "wrpn", "hwgq"]
_ALL = _FAST + ["zhuang_progressive", "zhuang_guided", "wage", "bireal", "elq", "nonuniform", "clipq",
                "vnq", "fqn"]

SUITES: dict[str, Suite] = {
    "demo": Suite("demo", "lenet5", "fashion-mnist", _FAST, ["8/8", "4/4", "2/2"], epochs=1, float_epochs=3),
    "quick": Suite("quick", "lenet5", "fashion-mnist", _ALL, ["8/8", "4/4", "2/2", "1/2", "1/1", "2/fp", "1/fp"],
                   epochs=1, float_epochs=3),
    "cifar10": Suite("cifar10", "resnet20", "cifar10", _ALL, ["8/8", "4/4", "2/2", "1/2", "2/fp"], epochs=12,
                     float_epochs=12, batch_size=256),
    # the YOLO-style detector on the composited Fashion-MNIST detection set: every layer and the head quantized.
    # QAT keeps the float model's BatchNorm statistics (freeze_bn 0, as FQN does): with BN training, LSQ W4A4 fell
    # from 70.6 to 48.0 mAP@0.5 in its last epoch, the eval-mode output drifting from the batch-statistics one
    # layer by layer (docs/RESULTS.md "Detection")
    "detection": Suite("detection", "yolo_tiny", "fashion-detection", ["qcode", "uniform", "pact", "pact_unsigned",
                                                                       "lsq", "fqn", "fqn_mse"], ["8/8", "4/4"],
                       epochs=3, float_epochs=16, first_last="same", batch_size=64, metric="map_50",
                       float_recipe={"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0005, "batch_size": 64},
                       qat_train={"optimizer": "adamw", "lr": 0.0005, "weight_decay": 0.0, "schedule": "cosine",
                                  "batch_size": 64, "freeze_bn": 0.0}),
    # torchvision's SSDlite (MobileNetV3-Large: Hardswish, squeeze-excitation, depthwise convs) on the same set
    "detection-ssd": Suite("detection-ssd", "ssdlite", "fashion-detection", ["qcode", "uniform", "pact", "lsq", "fqn",
                                                                             "fqn_mse"], ["8/8", "4/4"],
                           epochs=3, float_epochs=16, first_last="same", batch_size=64, metric="map_50",
                           float_recipe={"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.0005, "batch_size": 64},
                           qat_train={"optimizer": "adamw", "lr": 0.0005, "weight_decay": 0.0, "schedule": "cosine",
                                      "batch_size": 64, "freeze_bn": 0.0}),
}


def parse_bits(spec: str) -> tuple[int, int | None]:
    """``"4/4"`` -> (4, 4); ``"2/fp"`` -> (2, None)."""
    try:
        w, a = spec.split("/")
        w, a = int(w), (None if a.strip().lower() in ("fp", "32", "float") else int(a))
    except ValueError:
        raise ValueError(f"bad bit-width cell {spec!r}: expected W/A such as 4/4 or 2/fp") from None
    for v in (w, a):
        if v is not None and not 1 <= v <= 16:
            raise ValueError(f"bad bit-width cell {spec!r}: bit widths must lie in 1..16 (or fp for activations)")
    return w, a


def cell_key(method: str, bits: str) -> str:
    return f"{method}@{bits}"


def _scores(model, loader) -> dict:
    """The headline figure under its name (``top1``, or ``map_50``) plus a detector's ``map`` / ``map_75``."""
    res = evaluate(model, loader)
    keys = [metric_of(res)] + [k for k in ("map", "map_75") if k in res]
    return {k: float(res[k]) for k in keys}


def _example(bundle) -> torch.Tensor:
    x, _ = next(iter(bundle.test))
    return x[:1]


class Bench:
    """Runs a suite into ``out_dir`` (resumable)."""

    def __init__(self, suite: Suite, out_dir: str | Path, data_dir: str | None = None, device: str = "cpu",
                 init: str | None = None, seed: int = 0, log=print, workers: int = 1, threads: int | None = None,
                 time_limit: float | None = None):
        if int(workers) < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        if time_limit is not None and not time_limit > 0:
            raise ValueError(f"time_limit={time_limit} must be > 0 seconds")
        self.suite, self.out, self.data_dir, self.device = suite, Path(out_dir), data_dir, device
        self.init, self.seed, self.log = init, seed, log
        self.workers, self.threads, self.time_limit = int(workers), threads, time_limit
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.results = self._load_results()
        self._touched: set[str] = set()  # cells recorded since the last save (they win a merge with the file)
        self._bundles: dict = {}

    # -- persistence ---------------------------------------------------------------------------
    def _load_results(self) -> dict:
        if self.results_path.is_file():
            try:
                r = json.loads(self.results_path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.results_path} is not valid JSON ({e}); move it away to start afresh") from None
            if r.get("suite", {}).get("model") != self.suite.model or r.get("suite", {}).get(
                    "dataset") != self.suite.dataset:
                raise ValueError(f"{self.results_path} holds another suite ({r.get('suite')}); use another --out")
            return r
        return {"suite": asdict(self.suite), "float": {}, "cells": {}}

    def _save(self) -> None:
        """Merge with the file under an exclusive lock, then write atomically.

        Several ``qcnn bench`` processes may share one ``--out``: each re-reads ``results.json`` under
        ``results.json.lock`` (``fcntl.flock``), keeps every cell the others recorded meanwhile, puts the cells
        it recorded since its last save and its float figures over them, and writes the union; no process's
        cells are lost."""
        self.results["suite"] = asdict(self.suite)
        with open(self.out / "results.json.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                disk = self._load_results() if self.results_path.is_file() else None
                if disk is not None:
                    cells = dict(disk.get("cells", {}))
                    cells.update({k: v for k, v in self.results["cells"].items()
                                  if k in self._touched or k not in cells})
                    self.results["cells"] = cells
                    self.results["float"] = {**disk.get("float", {}), **self.results["float"]}
                write_text(self.results_path, json.dumps(self.results, indent=1))
                self._touched.clear()  # the file has them now; later copies elsewhere win over ours
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- data / models -------------------------------------------------------------------------
    def data(self, full: bool = False):
        """The suite's data; QAT cells train on ``train_images`` images, the float model on all of them."""
        from qcnn.data import get_data
        from qcnn.data.detection_loaders import detection_bundle, is_detection_set

        limit = None if full else self.suite.train_images
        load = detection_bundle if is_detection_set(self.suite.dataset) else get_data
        if limit not in self._bundles:
            self._bundles[limit] = load(self.suite.dataset, data_dir=self.data_dir,
                                            batch_size=self.suite.batch_size, device=self.device,
                                            seed=self.seed, train_limit=limit)
        return self._bundles[limit]

    def arch(self) -> dict:
        b = self.data()
        return {"name": self.suite.model, "num_classes": b.num_classes, "in_channels": b.in_channels}

    def build(self):
        a = self.arch()
        return build_model(a["name"], num_classes=a["num_classes"], in_channels=a["in_channels"])

    def float_model(self):
        """The float checkpoint every cell starts from (trained once by the suite unless ``init`` is given)."""
        from qcnn.checkpoint import load_model
        path = self.out / "float" / "model.pt"
        if self.init:
            model = self.build()
            load_weights(model, self.init)
            return model.to(self.device)
        if not path.is_file():
            from qcnn.recipes import TrainSpec
            from qcnn.train import fit

            self.log(f"[bench] training the float {self.suite.model} ({self.suite.float_epochs} epochs)")
            torch.manual_seed(self.seed)
            model = self.build().to(self.device)
            spec = TrainSpec(**({"epochs": self.suite.float_epochs, "optimizer": "adam", "lr": 0.004,
                                 "schedule": "onecycle", "weight_decay": 0.0} | self.suite.float_recipe))
            t0 = time.time()
            fit(model, self.data(full=True), spec, self.out / "float")
            save_model(path, model, self.arch(), metrics={"seconds": time.time() - t0})
        model, _ = load_model(path, device=self.device)
        return model

    # -- cells ---------------------------------------------------------------------------------
    def run(self, methods: list[str] | None = None, bits: list[str] | None = None) -> dict:
        """Run the pending cells (``methods`` x ``bits``, default the suite's), in that order."""
        methods = methods or self.suite.methods
        bits = bits or self.suite.bits
        for b in bits:
            parse_bits(b)
        t0 = time.time()
        float_model = self.float_model()
        bundle = self.data()
        M = self.suite.metric
        if M not in self.results["float"]:
            self.results["float"] = {**_scores(float_model, bundle.test), **self._size(float_model, bundle)}
            self._save()
        pending = []
        for m in methods:
            for b in bits:
                key = cell_key(m, b)
                if self.results["cells"].get(key, {}).get("status") in ("ok", "undefined"):
                    continue
                undefined = self._undefined(m, b)
                if undefined is not None:
                    self._record(key, undefined)
                else:
                    pending.append((m, b))
        try:
            if self.workers > 1:
                self._run_parallel(pending, t0)
            else:
                self._float_finetuned(float_model)
                for m, b in pending:
                    if self._out_of_time(t0):
                        break
                    self._record(cell_key(m, b), self._run_cell(float_model, m, b))
        finally:
            self._update_drops()
            write_reports(self.results, self.out)
        return self.results

    def _out_of_time(self, t0: float) -> bool:
        if self.time_limit is not None and time.time() - t0 > self.time_limit:
            self.log(f"[bench] time limit {self.time_limit:.0f} s reached: the remaining cells stay pending")
            return True
        return False

    def _record(self, key: str, cell: dict) -> None:
        self.results["cells"][key] = cell
        self._touched.add(key)
        self._save()
        self.log(f"[bench] {key:28s} {cell['status']:9s} "
                 + (f"{self.suite.metric} {cell[self.suite.metric]:.2f}  ({cell['seconds']:.0f} s)"
                    if cell["status"] == "ok"
                    else cell.get("reason", "")))

    def _update_drops(self) -> None:
        """Drops against the fine-tuned float reference (known only once it finished, in parallel runs)."""
        M = self.suite.metric
        ref = self.results["float"].get(f"finetuned_{M}", self.results["float"].get(M))
        changed = False
        for key, c in self.results["cells"].items():
            if c.get("status") == "ok" and ref is not None and c.get("drop") != ref - c[M]:
                c["drop"], changed = ref - c[M], True
                self._touched.add(key)
        if changed:
            self._save()

    def _worker_args(self) -> dict:
        return {"suite": asdict(self.suite), "out_dir": str(self.out), "data_dir": self.data_dir,
                "device": self.device, "init": self.init, "seed": self.seed,
                "threads": self.threads or max(1, (os.cpu_count() or 1) // self.workers)}

    def _run_parallel(self, pending: list[tuple[str, str]], t0: float) -> None:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        args = self._worker_args()
        deadline = None if self.time_limit is None else t0 + self.time_limit
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {}
            if f"finetuned_{self.suite.metric}" not in self.results["float"] and self.suite.epochs > 0:
                futures[pool.submit(_worker_task, args, None, None, deadline)] = "float"
            for m, b in pending:
                futures[pool.submit(_worker_task, args, m, b, deadline)] = cell_key(m, b)
            self.log(f"[bench] {len(futures)} task(s) on {self.workers} worker processes "
                     f"({args['threads']} thread(s) each, {self.device})")
            try:
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for f in done:
                        key = futures.pop(f)
                        try:
                            res = f.result()
                        except Exception as e:  # noqa: BLE001 - a crashed worker is reported like a failed cell
                            res = {"status": "error", "reason": f"worker failed: {type(e).__name__}: {e}"}
                            if key != "float":
                                m, b = key.split("@", 1)
                                res |= {"method": m, "bits": b}
                        if res is None:  # not started: out of time
                            continue
                        if key == "float":
                            if res.get("status") == "error":
                                self.log(f"[bench] float fine-tuning failed: {res['reason']}")
                            else:
                                self.results["float"].update(res)
                                self._save()
                                m = self.suite.metric
                                self.log(f"[bench] float fine-tuned: {m} {res[f'finetuned_{m}']:.2f}")
                        else:
                            self._record(key, res)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def _float_finetuned(self, float_model) -> None:
        """Float model trained with the same budget as the QAT cells (the fair reference)."""
        if f"finetuned_{self.suite.metric}" in self.results["float"] or self.suite.epochs == 0:
            return
        self.results["float"].update(self._finetune(float_model))
        self._save()

    def _finetune(self, float_model) -> dict:
        import copy

        from qcnn.recipes import load_recipe as _lr
        from qcnn.train import fit

        spec = dataclasses.replace(_lr("uniform_qat").train, **self.suite.qat_train)
        spec.epochs = self.suite.epochs
        model = copy.deepcopy(float_model)
        torch.manual_seed(self.seed)
        t0 = time.time()
        fit(model, self.data(), spec, None)
        scores = _scores(model, self.data().test)
        return {**{f"finetuned_{k}": v for k, v in scores.items()}, "finetune_seconds": time.time() - t0}

    def _size(self, model, bundle) -> dict:
        from qcnn.report.size import summarize

        s = summarize(model, _example(bundle))
        return {"size_bytes": s["size_bytes"], "bops": s["bops"]}

    def _undefined(self, name: str, bits: str) -> dict | None:
        """The ``undefined`` record of a cell the method does not define (or an unknown recipe), else None."""
        w, a = parse_bits(bits)
        try:
            recipe = load_recipe(name)
        except (ValueError, FileNotFoundError) as e:
            return {"method": name, "bits": bits, "status": "undefined", "reason": str(e)}
        reason = type(get_method(recipe.method, recipe.params)).defines(w, a)
        if reason is not None:
            return {"method": name, "bits": bits, "status": "undefined", "reason": reason}
        return None

    def _run_cell(self, float_model, name: str, bits: str) -> dict:
        import copy

        from qcnn.methods import run_recipe

        undefined = self._undefined(name, bits)
        if undefined is not None:
            return undefined
        w, a = parse_bits(bits)
        recipe = load_recipe(name)
        recipe = recipe.replace(w_bits=w, a_bits=a,
                                first_last=self.suite.first_last)
        if a is None:  # replace() skips None values: float activations are set explicitly
            recipe = dataclasses.replace(recipe, a_bits=None)
        if recipe.train.epochs > 0:
            recipe = recipe.replace(train={**self.suite.qat_train, "epochs": self.suite.epochs})
        out = self.out / "cells" / cell_key(name, bits).replace("/", "-")
        torch.manual_seed(self.seed)
        t0 = time.time()
        try:
            qmodel, metrics = run_recipe(copy.deepcopy(float_model), self.data(), recipe, out)
            scores = _scores(qmodel, self.data().test)
            # procedures that train another network (WAGE, Bi-Real) return it with its architecture record
            arch = arch_record(qmodel) or self.arch()
            save_model(out / "model.pt", qmodel, arch, recipe=recipe, metrics=scores)
        except Exception as e:  # noqa: BLE001 - one broken cell must not stop the suite; it is reported
            (out / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            write_text(out / "error.txt", traceback.format_exc())
            return {"method": name, "bits": bits, "status": "error", "reason": f"{type(e).__name__}: {e}"}
        # "drop" (against the fine-tuned float reference) is filled in by _update_drops
        return {"method": name, "bits": bits, "status": "ok", **scores,
                "seconds": time.time() - t0, "epochs": recipe.train.epochs,
                **self._size(qmodel, self.data())}


def _worker_task(args: dict, method: str | None, bits: str | None, deadline: float | None) -> dict | None:
    """One parallel task in a worker process: a cell, or (``method=None``) the fine-tuned float reference.

    Returns None without running when ``deadline`` (wall-clock seconds) has passed.
    """
    if deadline is not None and time.time() > deadline:
        return None
    torch.set_num_threads(int(args["threads"]))
    bench = Bench(Suite(**args["suite"]), args["out_dir"], data_dir=args["data_dir"], device=args["device"],
                  init=args["init"], seed=args["seed"], log=lambda *a, **k: None)
    float_model = bench.float_model()
    if method is None:
        return bench._finetune(float_model)
    return bench._run_cell(float_model, method, bits)


def write_reports(results: dict, out: str | Path) -> str:
    """Write results.md and the two plots; return the Markdown table."""
    out = Path(out)
    md = results_table(results)
    write_text(out / "results.md", md)
    try:
        plot_results(results, out)
    except Exception as e:  # noqa: BLE001 - plots are optional output; the table is the result
        print(f"[bench] plotting failed: {e}")
    return md


def results_table(results: dict) -> str:
    s = results["suite"]
    cells = results["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells.values()))
    bits = list(dict.fromkeys(s["bits"] + [c["bits"] for c in cells.values()]))
    bits = [b for b in bits if any(c["bits"] == b for c in cells.values())]
    f = results["float"]
    M = s.get("metric", "top1")
    label, unit = ("top-1", "%") if M == "top1" else ("mAP@0.5", " points")
    lines = [
        f"# Equal-bit-width benchmark: {s['model']} on {s['dataset']} (suite `{s['name']}`)",
        "",
        f"Float {label} {f.get(M, float('nan')):.2f}{unit}"
        + (f"; float fine-tuned with the same budget {f[f'finetuned_{M}']:.2f}{unit}" if f"finetuned_{M}" in f
           else "")
        + f". QAT budget per cell: {s['epochs']} epoch(s) on "
        + (f"{s['train_images']} training images" if s.get("train_images") else "the full training set")
        + f"; first/last layers: {s['first_last']}. Cells: {label} {'%' if M == 'top1' else 'points'} "
        "(drop vs the fine-tuned float); "
        "`n/a` = the method does not define that setting.",
        "",
        "| method | " + " | ".join(f"W{b.replace('/', '/A')}" for b in bits) + " |",
        "|---|" + "---|" * len(bits),
    ]
    for m in methods:
        row = []
        for b in bits:
            c = cells.get(cell_key(m, b))
            if c is None:
                row.append("")
            elif c["status"] == "ok":
                row.append(f"{c[M]:.2f} ({-c['drop']:+.2f})")
            elif c["status"] == "undefined":
                row.append("n/a")
            else:
                row.append("error")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    notes = [f"- {k}: {c['reason']}" for k, c in cells.items() if c["status"] == "error"]
    if notes:
        lines += ["", "Errors:", *notes]
    lines += ["", "Model size (KiB) and BOPs (G) per cell:", "",
              f"| cell | {label} | size KiB | GBOPs | seconds |", "|---|---|---|---|---|"]
    lines.append(f"| float | {f.get(M, float('nan')):.2f} | {f.get('size_bytes', 0) / 1024:.1f} | "
                 f"{f.get('bops', 0) / 1e9:.3f} | |")
    for k, c in cells.items():
        if c["status"] == "ok":
            lines.append(f"| {k} | {c[M]:.2f} | {c['size_bytes'] / 1024:.1f} | {c['bops'] / 1e9:.3f} | "
                         f"{c['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"].values() if c["status"] == "ok"]
    bits = [b for b in results["suite"]["bits"] if any(c["bits"] == b for c in cells)]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    name = f"{results['suite']['model']} / {results['suite']['dataset']}"
    f = results["float"]
    M = results["suite"].get("metric", "top1")
    ylabel = "test top-1 (%)" if M == "top1" else f"test {M.replace('map_50', 'mAP@0.5')} (points)"
    # one float reference for both plots: the fine-tuned float model where the suite fine-tunes one
    ref = f.get(f"finetuned_{M}", f.get(M))
    ref_label = "float (fine-tuned)" if f"finetuned_{M}" in f else "float"
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.6 / max(1, len(methods))  # bit widths are categories: methods side by side, no lines between them
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j, b in enumerate(bits)
              for c in cells if c["method"] == m and c["bits"] == b]
        ys = [c[M] for b in bits for c in cells if c["method"] == m and c["bits"] == b]
        ax.scatter(xs, ys, marker="o", s=28, label=m)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1, label=ref_label)
    ax.set_xticks(range(len(bits)), [f"W{b.replace('/', '/A')}" for b in bits])
    ax.set_xlabel("bit width (weights / activations)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}: accuracy vs bit width")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bits.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        pts = [(c["size_bytes"] / 1024, c[M]) for c in cells if c["method"] == m]
        ax.scatter(*zip(*pts), label=m, s=25)
    if "size_bytes" in f and ref is not None:
        ax.scatter([f["size_bytes"] / 1024], [ref], marker="*", s=120, color="k", label=ref_label)
    ax.set_xscale("log")
    ax.set_xlabel("model size (KiB, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{name}: accuracy vs model size")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_size.png", dpi=120)
    plt.close(fig)


__all__ = ["SUITES", "Bench", "Suite", "parse_bits", "plot_results", "results_table", "save_atomic",
           "write_reports"]

"""The equal-bit-width benchmark on real Fashion-MNIST: cells, resumption, undefined cells, reports."""

import dataclasses
import json

import pytest
import torch

from qcnn.bench import SUITES, Bench, parse_bits, results_table
from qcnn.checkpoint import save_model
from qcnn.data import get_data
from qcnn.models import build_model
from qcnn.recipes import TrainSpec
from qcnn.train import evaluate, fit


@pytest.fixture(scope="module")
def float_lenet(tmp_path_factory, fashion_dir):
    torch.manual_seed(0)
    bundle = get_data("fashion-mnist", train_limit=8192)
    model = build_model("lenet5", num_classes=10, in_channels=1)
    fit(model, bundle, TrainSpec(epochs=1, optimizer="adam", lr=0.004, schedule="onecycle", weight_decay=0.0))
    path = tmp_path_factory.mktemp("float") / "model.pt"
    save_model(path, model, {"name": "lenet5", "num_classes": 10, "in_channels": 1})
    return path, evaluate(model, get_data("fashion-mnist").test)["top1"]


def test_parse_bits():
    assert parse_bits("4/4") == (4, 4)
    assert parse_bits("2/fp") == (2, None)
    with pytest.raises(ValueError, match="bad bit-width cell 'x4'"):
        parse_bits("x4")


def test_bench_cells_resume_and_report(tmp_path, float_lenet):
    init, float_top1 = float_lenet
    suite = dataclasses.replace(SUITES["demo"], epochs=1, train_images=2048)
    log = []
    bench = Bench(suite, tmp_path, init=str(init), log=log.append)
    res = bench.run(["uniform_qat", "no_such_recipe"], ["8/8", "2/fp"])
    assert abs(res["float"]["top1"] - float_top1) < 1e-6
    c88 = res["cells"]["uniform_qat@8/8"]
    assert c88["status"] == "ok"
    # 8-bit QAT from a converged float model stays close to the float model fine-tuned with the same budget
    assert c88["top1"] > res["float"]["finetuned_top1"] - 1.5
    assert res["cells"]["no_such_recipe@8/8"]["status"] == "undefined"
    c2 = res["cells"]["uniform_qat@2/fp"]
    assert c2["status"] == "ok" and c2["size_bytes"] < c88["size_bytes"]
    # W/Afp means float activations: no activation quantizer in the saved cell, and no bit-ops at 8 bits
    from qcnn.checkpoint import load_model
    from qcnn.nn.layers import QConv2d, QLinear

    cell, _ = load_model(tmp_path / "cells" / "uniform_qat@2-fp" / "model.pt")
    layers = [m for m in cell.modules() if isinstance(m, (QConv2d, QLinear))]
    assert layers and all(m.input_quant is None for m in layers)
    assert c2["bops"] > c88["bops"]  # 2 x 32-bit products cost more bit-ops than 8 x 8
    md = (tmp_path / "results.md").read_text()
    assert "| uniform_qat |" in md and "n/a" in md
    assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 1000
    # a second run skips finished cells
    bench2 = Bench(suite, tmp_path, init=str(init), log=log.append)
    res2 = bench2.run(["uniform_qat"], ["8/8"])
    assert res2["cells"]["uniform_qat@8/8"]["seconds"] == c88["seconds"]
    assert json.loads((tmp_path / "results.json").read_text())["cells"].keys() == res2["cells"].keys()
    assert "uniform_qat" in results_table(res2)


def test_bench_refuses_another_suite_in_same_dir(tmp_path, float_lenet):
    (tmp_path / "results.json").write_text(json.dumps({"suite": {"model": "resnet20", "dataset": "cifar10"}}))
    with pytest.raises(ValueError, match="holds another suite"):
        Bench(SUITES["demo"], tmp_path, init=str(float_lenet[0]))


def test_parallel_workers_match_sequential_cells(tmp_path, float_lenet):
    """Cells run in worker processes give the same numbers as in-process (same seed, one thread each)."""
    init, _ = float_lenet
    suite = dataclasses.replace(SUITES["demo"], epochs=1, train_images=1024)
    cells = (["uniform_qat", "qcode", "no_such_recipe"], ["8/8"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seq = Bench(suite, tmp_path / "seq", init=str(init), log=lambda *a: None).run(*cells)
    finally:
        torch.set_num_threads(threads)
    par = Bench(suite, tmp_path / "par", init=str(init), log=lambda *a: None, workers=2, threads=1).run(*cells)
    assert par["float"]["finetuned_top1"] == pytest.approx(seq["float"]["finetuned_top1"], abs=1e-9)
    for key in ("uniform_qat@8/8", "qcode@8/8"):
        assert par["cells"][key]["status"] == "ok"
        assert par["cells"][key]["top1"] == pytest.approx(seq["cells"][key]["top1"], abs=1e-9)
        # drops are against the fine-tuned float reference, even though it finished in another process
        assert par["cells"][key]["drop"] == pytest.approx(par["float"]["finetuned_top1"] - par["cells"][key]["top1"])
    assert par["cells"]["no_such_recipe@8/8"]["status"] == "undefined"
    assert (tmp_path / "par" / "cells" / "qcode@8-8" / "model.pt").is_file()


def test_time_limit_leaves_cells_pending_and_bad_options(tmp_path, float_lenet):
    init, _ = float_lenet
    suite = dataclasses.replace(SUITES["demo"], epochs=1, train_images=512)
    res = Bench(suite, tmp_path, init=str(init), log=lambda *a: None, time_limit=1e-6).run(
        ["uniform_qat", "no_such_recipe"], ["8/8"])
    assert "uniform_qat@8/8" not in res["cells"]  # pending: a later run picks it up
    assert res["cells"]["no_such_recipe@8/8"]["status"] == "undefined"
    assert (tmp_path / "results.md").is_file()
    with pytest.raises(ValueError, match="workers=0"):
        Bench(suite, tmp_path, init=str(init), workers=0)
    with pytest.raises(ValueError, match="time_limit=-1"):
        Bench(suite, tmp_path, init=str(init), time_limit=-1)


def test_two_benches_on_one_out_keep_each_others_cells(tmp_path):
    """Two processes sharing --out: each save re-reads the file under the lock and merges, so neither
    loses the other's cells (before, the second writer's results.json dropped the first's)."""
    suite = SUITES["demo"]
    a, b = Bench(suite, tmp_path, log=lambda m: None), Bench(suite, tmp_path, log=lambda m: None)
    cell = {"status": "ok", "top1": 80.0, "seconds": 1.0}
    a._record("pact@4-4", {**cell, "top1": 81.0})
    b._record("lsq@4-4", {**cell, "top1": 82.0})
    a._record("dorefa@4-4", {**cell, "top1": 83.0})
    on_disk = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert {k: v["top1"] for k, v in on_disk.items()} == {"pact@4-4": 81.0, "lsq@4-4": 82.0, "dorefa@4-4": 83.0}
    # a cell recorded again by one process replaces the file's copy; a stale in-memory copy never does
    b._record("pact@4-4", {**cell, "top1": 84.0})
    a._record("wrpn@4-4", {**cell, "top1": 85.0})
    on_disk = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert on_disk["pact@4-4"]["top1"] == 84.0 and len(on_disk) == 4
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_refuses_bad_cells_and_unknown_methods(tmp_path, capsys):
    from qcnn.cli import main

    with pytest.raises(ValueError, match="'0/8'.*1..16"):
        parse_bits("0/8")
    with pytest.raises(ValueError, match="'4/17'"):
        parse_bits("4/17")
    assert main(["bench", "--suite", "demo", "--bits", "0/8", "--out", str(tmp_path / "a")]) == 2
    assert "'0/8'" in capsys.readouterr().err
    assert main(["bench", "--suite", "demo", "--methods", "pact,nosuch", "--out", str(tmp_path / "b")]) == 2
    assert "unknown method(s) ['nosuch']" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plots_name_the_model_treat_bit_widths_as_categories_and_share_the_float_reference(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from qcnn.bench import plot_results

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    cells = {f"{m}:{b}": {"method": m, "bits": b, "status": "ok", "top1": t, "size_bytes": sz}
             for m, b, t, sz in [("pact", "4/4", 90.0, 4000), ("pact", "2/2", 80.0, 2000),
                                 ("lsq", "4/4", 91.0, 4000), ("lsq", "2/2", 85.0, 2000)]}
    results = {"suite": {"model": "resnet20", "dataset": "cifar10", "bits": ["4/4", "2/2"]}, "cells": cells,
               "float": {"top1": 92.0, "finetuned_top1": 92.5, "size_bytes": 32000}}
    plot_results(results, tmp_path)
    bits_ax, size_ax = saved[0].axes[0], saved[1].axes[0]
    for ax in (bits_ax, size_ax):
        assert "resnet20" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    # no line joins the categorical bit widths: the only line is the float reference, at the fine-tuned top-1
    assert [tuple(ln.get_ydata()) for ln in bits_ax.lines] == [(92.5, 92.5)]
    assert [t.get_text() for t in bits_ax.get_xticklabels()] == ["W4/A4", "W2/A2"]
    star = size_ax.collections[-1].get_offsets()
    assert float(star[0][1]) == 92.5  # the same reference in both plots

"""CLIP-Q procedure: the search runs optuna studies, the Lagrangian choice meets a target, training on
real Fashion-MNIST lowers the loss while every layer keeps at most 2^b values and its sparsity."""

from __future__ import annotations

import optuna
import pytest
import torch

from qcnn.methods import quantize, run_recipe
from qcnn.methods.clipq import SearchOptions, bits_per_weight, search, select
from qcnn.models import build_model
from qcnn.recipes import Recipe
from qcnn.transform import quantized_layers


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    from qcnn.data import get_data

    return get_data("fashion-mnist", data_dir=fashion_dir, batch_size=64, augment=False, calib_size=500).take(1024)


def _recipe(**pp):
    return Recipe.from_dict({"method": "clipq", "w_bits": 3, "a_bits": None, "first_last": "same", "procedure": "clipq",
                             "procedure_params": pp,
                             "train": {"epochs": 1, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}})


def test_search_runs_one_optuna_study_per_layer():
    torch.manual_seed(0)
    q = quantize(build_model("lenet5", in_channels=1), _recipe())
    batches = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(2)]
    opts = SearchOptions(trials=3, startup_trials=2, eval_images=64, seed=1)
    res = search(q, batches, opts, log=lambda *_: None)
    names = [n for n, _ in quantized_layers(q)]
    assert list(res["studies"]) == names
    for name, study in res["studies"].items():
        assert isinstance(study, optuna.study.Study)
        assert isinstance(study.sampler, optuna.samplers.GPSampler)
        assert len(study.trials) == 3
        chosen = res["layers"][name]
        assert {"p": chosen["p"], "bits": chosen["bits"]} in [t.params for t in study.trials]
        m = q.get_submodule(name)
        assert (m.weight_quant.bits, float(m.weight_quant.p)) == (chosen["bits"], pytest.approx(chosen["p"]))


def test_select_meets_target_ratio():
    sizes = {"a": 1000, "b": 100}
    records = {n: [{"p": 0.0, "bits": 4, "err": 0.10, "bpw": 4.0}, {"p": 0.8, "bits": 2, "err": 0.12,
                                                                       "bpw": bits_per_weight(0.8, 2)}]
               for n in sizes}
    choice, lam = select(records, sizes, lam=0.0)
    assert choice["a"]["bits"] == 4  # lambda 0: lowest error
    choice, lam = select(records, sizes, lam=0.0, target_ratio=20.0)
    assert choice["a"]["bits"] == 2 and lam > 0
    assert bits_per_weight(0.8, 2) == pytest.approx(1.4)


def test_clipq_training_on_fashion_mnist_improves_loss(fashion):
    torch.manual_seed(0)
    q = quantize(build_model("lenet5", in_channels=1), Recipe.from_dict(
        {"method": "clipq", "w_bits": 3, "a_bits": None, "first_last": "same", "params": {"p": 0.5}}))
    x_eval, y_eval = next(iter(fashion.test))
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        before = loss_fn(q.eval()(x_eval), y_eval).item()
    q.train()
    for _ in range(2):
        for x, y in fashion.train:
            opt.zero_grad()
            loss_fn(q(x), y).backward()
            opt.step()
    with torch.no_grad():
        after = loss_fn(q.eval()(x_eval), y_eval).item()
        assert after < 0.7 * before
        for _, m in quantized_layers(q):
            wq = m.quantized_weight()
            assert torch.unique(wq).numel() <= 2**3
            n_pos, n_neg = int((m.weight > 0).sum()), int((m.weight < 0).sum())
            assert int((wq == 0).sum()) == int(0.5 * n_pos) + int(0.5 * n_neg)


def test_procedure_searches_then_fine_tunes(fashion, tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1)
    recipe = _recipe(trials=2, startup_trials=2, eval_images=128, target_ratio=12.0, sampler="tpe")
    qmodel, metrics = run_recipe(model, fashion, recipe, tmp_path)
    assert metrics["search"]["estimated_ratio"] >= 12.0
    table = {r["name"]: r for r in metrics["clipq_layers"]}
    assert set(table) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    for name, row in table.items():
        assert row["levels"] <= 2 ** row["bits"]
        assert qmodel.get_submodule(name).weight_quant.bits == row["bits"]
    assert metrics["top1"] > 30.0  # one short epoch from scratch on 1k images, 10 classes
    assert (tmp_path / "clipq_layers.json").is_file()


def test_bad_procedure_params():
    with pytest.raises(ValueError, match="unknown procedure_params"):
        SearchOptions.from_dict({"trails": 3})
    with pytest.raises(ValueError, match="sampler"):
        SearchOptions(sampler="random")


def _layers_recipe(layers, **pp):
    return Recipe.from_dict({"method": "clipq", "w_bits": 3, "a_bits": None, "first_last": "same", "procedure": "clipq",
                             "procedure_params": {"layers": layers, **pp},
                             "train": {"epochs": 0}})


_TABLE = {"conv1": (0.1, 4), "conv2": (0.35, 2), "fc1": (0.8, 3), "fc2": (0.55, 2), "fc3": (0.0, 4)}


@pytest.mark.parametrize("form", ["file", "list", "mapping", "pairs"])
def test_layers_option_applies_each_layer_without_search(fashion, tmp_path, monkeypatch, form):
    import json
    import sys

    rows = [{"name": n, "p": p, "bits": b, "numel": 1, "zero_fraction": 0.0, "levels": 1}
            for n, (p, b) in _TABLE.items()]
    if form == "file":  # the clipq_layers.json format, path relative to the working directory
        (tmp_path / "prev").mkdir()
        (tmp_path / "prev" / "clipq_layers.json").write_text(json.dumps({"layers": rows, "search": None}))
        monkeypatch.chdir(tmp_path)
        spec = "prev/clipq_layers.json"
    elif form == "list":
        spec = rows
    elif form == "mapping":
        spec = {n: {"p": p, "bits": b} for n, (p, b) in _TABLE.items()}
    else:
        spec = {n: [p, b] for n, (p, b) in _TABLE.items()}
    monkeypatch.setitem(sys.modules, "optuna", None)  # any `import optuna` now fails
    torch.manual_seed(0)
    qmodel, metrics = run_recipe(build_model("lenet5", in_channels=1), fashion,
                                 _layers_recipe(spec, trials=3), tmp_path / "out")
    assert "search" not in metrics
    table = {r["name"]: r for r in metrics["clipq_layers"]}
    assert set(table) == set(_TABLE)
    for name, (p, b) in _TABLE.items():
        q = qmodel.get_submodule(name).weight_quant
        assert q.bits == b and int(q.nbits) == b and float(q.p) == pytest.approx(p)
        assert (table[name]["p"], table[name]["bits"]) == (pytest.approx(p), b)
        w = qmodel.get_submodule(name).weight
        n_pos, n_neg = int((w > 0).sum()), int((w < 0).sum())
        wq = q(w)
        assert int((wq == 0).sum()) == int(p * n_pos) + int(p * n_neg)
        assert torch.unique(wq).numel() <= 2**b
    saved = json.loads((tmp_path / "out" / "clipq_layers.json").read_text())
    assert {r["name"]: (r["p"], r["bits"]) for r in saved["layers"]} == {n: (pytest.approx(p), b)
                                                                          for n, (p, b) in _TABLE.items()}


def test_layers_option_errors_name_the_layer(fashion, tmp_path):
    extra = {**{n: [p, b] for n, (p, b) in _TABLE.items()}, "fc9": [0.5, 3]}
    with pytest.raises(ValueError, match="fc9"):
        run_recipe(build_model("lenet5", in_channels=1), fashion, _layers_recipe(extra))
    missing = {n: [p, b] for n, (p, b) in _TABLE.items() if n != "conv2"}
    with pytest.raises(ValueError, match="conv2"):
        run_recipe(build_model("lenet5", in_channels=1), fashion, _layers_recipe(missing))
    with pytest.raises(ValueError, match="nowhere.json"):
        run_recipe(build_model("lenet5", in_channels=1), fashion, _layers_recipe(str(tmp_path / "nowhere.json")))
    bad_bits = {**{n: [p, b] for n, (p, b) in _TABLE.items()}, "fc1": [0.5, 2.5]}
    with pytest.raises(ValueError, match="fc1"):
        run_recipe(build_model("lenet5", in_channels=1), fashion, _layers_recipe(bad_bits))
    bad_p = {**{n: [p, b] for n, (p, b) in _TABLE.items()}, "fc2": [1.2, 2]}
    with pytest.raises(ValueError, match="fc2"):
        run_recipe(build_model("lenet5", in_channels=1), fashion, _layers_recipe(bad_p))


def test_clipq_with_activation_bits_quantizes_a_residual_network():
    """The residual adds of a ResNet get the signed uniform grid every method gives them (max(a_bits, 8) bits:
    the integer accumulator path), calibrated like every other quantizer (this used to raise AttributeError)."""
    from qcnn.calib import calibrating
    from qcnn.quant.uniform import UniformQuantizer

    torch.manual_seed(0)
    q = quantize(build_model("resnet20"), Recipe(method="clipq", w_bits=4, a_bits=4))
    adds = {n: m for n, m in q.named_modules() if n.endswith("out_quant")}
    assert len(adds) == 9 and all(isinstance(m, UniformQuantizer) and m.bits == 8 and m.signed
                                  for m in adds.values())
    with calibrating(q):
        q(torch.randn(4, 3, 32, 32))
    assert all(m.is_initialized() for m in adds.values())

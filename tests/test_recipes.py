"""Every recipe ships in the package, loads by name from any directory and names a real method and procedure;
the QAT recipes train on real Fashion-MNIST data (a few steps of LeNet-5) with a falling loss."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from qcnn.methods import get_procedure, quantize_and_calibrate, run_recipe
from qcnn.methods.base import get_method
from qcnn.recipes import PACKAGED_RECIPES, Recipe, find_recipe, list_recipes, load_recipe

REPO = Path(__file__).resolve().parents[1]
ALL = sorted(PACKAGED_RECIPES.glob("*.yaml"))
QAT_RECIPES = ["dorefa", "pact", "wrpn", "hwgq", "lsq", "zhuang_two_step", "zhuang_progressive", "zhuang_guided"]
#: one recipe per method and procedure of the survey (README table)
METHOD_RECIPES = {"bireal", "clipq", "dorefa", "elq", "fqn", "fqn_mse", "hwgq", "lsq", "nonuniform", "pact",
                  "pact_unsigned", "qcode", "uniform", "uniform_qat", "vnq", "wage", "wrpn", "zhuang_guided",
                  "zhuang_progressive", "zhuang_two_step"}


def test_the_package_holds_every_method_recipe(monkeypatch):
    import qcnn.recipes

    monkeypatch.delenv("QCNN_RECIPES", raising=False)
    assert PACKAGED_RECIPES == Path(qcnn.recipes.__file__).resolve().parent / "data"
    assert {p.stem for p in ALL} == METHOD_RECIPES
    assert set(list_recipes()) == METHOD_RECIPES


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_every_recipe_loads(path):
    r = Recipe.from_yaml(path)
    get_method(r.method, r.params)  # unknown method or option raises
    get_procedure(r.procedure)
    assert Recipe.from_dict(r.to_dict()) == r


def test_every_recipe_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    """``pact``, ``pact.yaml`` and ``recipes/pact.yaml`` are the packaged recipe wherever the process runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QCNN_RECIPES", raising=False)
    for name in sorted(METHOD_RECIPES):
        packaged = Recipe.from_yaml(PACKAGED_RECIPES / f"{name}.yaml")
        for spelling in (name, f"{name}.yaml", f"recipes/{name}.yaml", str(REPO / "recipes" / f"{name}.yaml")):
            assert find_recipe(spelling) == PACKAGED_RECIPES / f"{name}.yaml", spelling
            assert load_recipe(spelling) == packaged, spelling
        assert Recipe.from_yaml(f"recipes/{name}.yaml") == packaged  # the former repository paths still load


def test_a_file_given_by_path_is_that_file(tmp_path, monkeypatch):
    """An existing file wins over the packaged recipe of the same name; an absolute path works from anywhere."""
    mine = tmp_path / "pact.yaml"
    mine.write_text("method: pact\nw_bits: 3\na_bits: 3\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("pact.yaml").w_bits == 3  # ./pact.yaml
    assert load_recipe("pact").w_bits == load_recipe(PACKAGED_RECIPES / "pact.yaml").w_bits == 4  # the name
    monkeypatch.chdir(REPO)
    assert load_recipe(str(mine)).w_bits == 3


def test_own_recipe_folders_come_first(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("method: lsq\nw_bits: 2\na_bits: 2\n")
    (tmp_path / "pact.yaml").write_text("method: pact\nw_bits: 5\na_bits: 5\n")
    monkeypatch.setenv("QCNN_RECIPES", str(tmp_path))
    assert {"mine", "pact"} <= set(list_recipes()) and METHOD_RECIPES <= set(list_recipes())
    assert load_recipe("mine").method == "lsq" and load_recipe("pact").w_bits == 5


@pytest.mark.parametrize("spelling, error, match", [
    ("pakt", ValueError, r"unknown recipe 'pakt'; did you mean 'pact'\? available recipes: bireal, clipq, .*wrpn"),
    ("zhuang_two", ValueError, r"did you mean 'zhuang_two_step'"),
    ("xyzzy", ValueError, r"unknown recipe 'xyzzy'; available recipes: bireal"),
    ("recipes/lsqq.yaml", FileNotFoundError, r"'recipes/lsqq.yaml' does not exist and 'lsqq' is not a named recipe; "
                                             r"did you mean 'lsq'"),
    ("no/such/dir/r.yaml", FileNotFoundError, r"'no/such/dir/r.yaml' does not exist; named recipes: bireal"),
])
def test_unknown_names_list_the_available_recipes(spelling, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QCNN_RECIPES", raising=False)
    with pytest.raises(error, match=match):
        load_recipe(spelling)


@pytest.mark.slow
def test_a_built_wheel_ships_the_recipes(tmp_path):
    """``pip install .`` (not editable) installs a wheel: it must carry every recipe inside the package."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "qcnn", src / "qcnn", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    code = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": ""}
    name = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, env=env, check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(tmp_path / "dist" / name) as z:
        shipped = {Path(n).stem for n in z.namelist() if n.startswith("qcnn/recipes/data/") and n.endswith(".yaml")}
        assert z.read("qcnn/recipes/data/pact.yaml") == (PACKAGED_RECIPES / "pact.yaml").read_bytes()
    assert shipped == METHOD_RECIPES


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    from qcnn.data import get_data

    b = get_data("fashion-mnist", data_dir=fashion_dir, batch_size=64, calib_size=128, augment=False)
    b.train = b.train.take(64 * 12)
    b.test = b.test.take(256)
    return b


@pytest.mark.slow
@pytest.mark.parametrize("name", QAT_RECIPES)
def test_qat_recipe_trains_on_fashion_mnist(name, fashion):
    from qcnn.models import build_model
    from qcnn.train import evaluate

    torch.manual_seed(0)
    # the recipe's method and procedure, with a short fixed-rate optimiser so that a few steps from a random
    # initialisation must lower the loss
    recipe = load_recipe(name).replace(
        train={"epochs": 1, "optimizer": "adam", "lr": 0.003, "schedule": "constant", "weight_decay": 0.0})
    model = build_model("lenet5", num_classes=10, in_channels=1)
    before = evaluate(quantize_and_calibrate(model, recipe, fashion), fashion.test)["loss"]
    qmodel, metrics = run_recipe(model, fashion, recipe)
    after = evaluate(qmodel, fashion.test)
    assert after["loss"] < before - 0.1, (before, after)
    assert after["top1"] > 25.0


@pytest.mark.parametrize("text, match", [
    ("method: pact\ntrain: {epochs: '2'}\n", r"bad\.yaml.*train: epochs='2' must be int"),
    ("method: pact\ntrain: {epochs: 1.5}\n", r"bad\.yaml.*epochs=1\.5 must be int"),
    ("method: pact\nper_channel: 'no'\n", r"bad\.yaml.*per_channel='no' must be bool"),
    ("method: pact\nw_bits: 4.0\n", r"w_bits=4\.0 must be int"),
    ("method: pact\ncalib_images: true\n", r"calib_images=True must be int"),
    ("method: 3\n", r"method=3 must be str"),
    ("method: pact\ntrain: [1, 2]\n", r"bad\.yaml.*train must be a mapping"),
    ("method: pact\noverrides: [{pattern: 'layer1.*', w_bits: 'x'}]\n", r"override 0: w_bits='x'"),
    ("method: pact\n\tw_bits: 4\n", r"bad\.yaml.*not valid YAML"),
    ("method: [pact\n", r"bad\.yaml.*not valid YAML"),
    ("", r"bad\.yaml.*is empty"),
    ("# only a comment\n", r"is empty"),
])
def test_bad_recipe_files_name_the_file_key_and_value(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        Recipe.from_yaml(p)


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    """YAML 1.1 reads ``lr: 1e-3`` as the string '1e-3': a float field takes it as the number."""
    p = tmp_path / "r.yaml"
    p.write_text("method: pact\ntrain: {lr: 1e-3, weight_decay: 0}\n")
    r = Recipe.from_yaml(p)
    assert r.train.lr == 1e-3 and isinstance(r.train.lr, float) and r.train.weight_decay == 0.0

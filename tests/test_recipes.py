"""Every recipe under recipes/ loads and names a real method and procedure; the QAT recipes train on real
Fashion-MNIST data (a few steps of LeNet-5) with a falling loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qcnn.methods import get_procedure, quantize_and_calibrate, run_recipe
from qcnn.methods.base import get_method
from qcnn.recipes import Recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(RECIPES.glob("*.yaml"))
QAT_RECIPES = ["dorefa", "pact", "wrpn", "hwgq", "lsq", "zhuang_two_step", "zhuang_progressive", "zhuang_guided"]


def test_recipe_folder_holds_the_qat_recipes():
    names = {p.stem for p in ALL}
    assert set(QAT_RECIPES) <= names


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_every_recipe_loads(path):
    r = Recipe.from_yaml(path)
    get_method(r.method, r.params)  # unknown method or option raises
    get_procedure(r.procedure)
    assert Recipe.from_dict(r.to_dict()) == r


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
    recipe = Recipe.from_yaml(RECIPES / f"{name}.yaml").replace(
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

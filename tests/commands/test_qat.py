"""``qcnn qat`` end to end on real Fashion-MNIST: recipe + flag overrides, model.pt that ``qcnn eval``
evaluates to the same accuracy, procedures through the same command, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from qcnn.checkpoint import load_model
from qcnn.cli import main


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _qat(fashion_dir, out, *extra):
    return main(["qat", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                 "--batch-size", "64", "--epochs", "1", "--limit-train", "384", "--limit-test", "256",
                 "--out", str(out), "--json", *extra])


@pytest.mark.slow
def test_qat_then_eval_gives_the_same_accuracy(fashion_dir, tmp_path, capsys):
    torch.manual_seed(0)
    assert _qat(fashion_dir, tmp_path, "--recipe", "pact", "--w-bits", "3", "--a-bits", "2",
                "--lr", "0.003") == 0
    res = _last_json(capsys)
    assert (res["method"], res["w_bits"], res["a_bits"], res["first_last"]) == ("pact", 3, 2, "8bit")
    assert res["float_top1"] is not None and res["drop"] == pytest.approx(res["float_top1"] - res["top1"], abs=1e-3)
    model, info = load_model(tmp_path / "model.pt")
    assert info["recipe"]["w_bits"] == 3 and info["recipe"]["train"]["lr"] == 0.003
    assert info["recipe"]["params"]["alpha_decay"] == 0.0002  # the recipe file's options survive
    assert main(["eval", "--checkpoint", str(tmp_path / "model.pt"), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--limit-test", "256", "--json"]) == 0
    assert _last_json(capsys)["top1"] == pytest.approx(res["top1"], abs=1e-6)


@pytest.mark.slow
def test_procedure_recipe_runs_through_the_same_command(fashion_dir, tmp_path, capsys):
    assert _qat(fashion_dir, tmp_path, "--recipe", "zhuang_two_step.yaml", "--w-bits", "2") == 0
    res = _last_json(capsys)
    assert res["procedure"] == "two_step" and res["w_bits"] == 2
    assert (tmp_path / "stage0" / "stage.pt").is_file() and (tmp_path / "model.pt").is_file()


def test_bad_input_is_reported(fashion_dir, tmp_path, capsys):
    assert _qat(fashion_dir, tmp_path, "--recipe", str(tmp_path / "missing.yaml")) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert _qat(fashion_dir, tmp_path, "--recipe", "recipes/pact.yaml", "--w-bits", "0") == 2
    assert "w_bits=0" in capsys.readouterr().err
    assert _qat(fashion_dir, tmp_path, "--recipe", "pakt") == 2  # an unknown name: the close one and the list
    err = capsys.readouterr().err
    assert "unknown recipe 'pakt'" in err and "did you mean 'pact'" in err and "zhuang_two_step" in err

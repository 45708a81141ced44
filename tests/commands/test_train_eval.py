"""``qcnn train`` / ``qcnn eval`` / ``qcnn models`` end to end, through the CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch

from qcnn.checkpoint import load_checkpoint, load_model
from qcnn.cli import main


def _last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_dir):
    out = tmp_path_factory.mktemp("train") / "run"
    argv = ["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
            "--epochs", "1", "--limit-train", "3000", "--batch-size", "100", "--out", str(out), "--json"]
    return out, argv


def test_train_writes_run_directory_and_json(trained, capsys):
    out, argv = trained
    assert main(argv) == 0
    figures = _last_json(capsys)
    assert set(figures) >= {"top1", "loss", "epochs", "seconds", "model"}
    assert figures["epochs"] == 1 and 60.0 <= figures["top1"] <= 100.0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["test_top1"] == pytest.approx(figures["top1"], abs=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "lenet5" and config["model"]["in_channels"] == 1
    # lenet5 / fashion-mnist defaults: Adam with one-cycle
    assert config["train"]["optimizer"] == "adam" and config["train"]["schedule"] == "onecycle"
    assert config["train"]["batch_size"] == 100
    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["format"] == "qcnn-model/1" and ckpt["arch"]["kwargs"] == {"image_size": 28}
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_eval_reproduces_the_training_accuracy(trained, capsys, fashion_dir):
    out, _ = trained
    if not (out / "model.pt").exists():
        pytest.skip("needs test_train_writes_run_directory_and_json")
    trained_top1 = json.loads((out / "result.json").read_text())["top1"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--dataset", "fashion-mnist",
                 "--data-dir", str(fashion_dir), "--json"]) == 0
    figures = _last_json(capsys)
    assert figures["top1"] == pytest.approx(trained_top1, abs=1e-4)
    assert figures["engine"] == "float" and figures["model"] == "lenet5" and figures["images"] == 10000
    # --model disagreeing with the checkpoint, fakequant on a float model: clear errors, exit code 2
    assert main(["eval", "--model", "resnet20", "--checkpoint", str(out / "model.pt"), "--dataset",
                 "fashion-mnist", "--data-dir", str(fashion_dir)]) == 2
    assert "holds a 'lenet5' model, not --model 'resnet20'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--dataset", "fashion-mnist",
                 "--data-dir", str(fashion_dir), "--engine", "fakequant"]) == 2
    assert "needs a quantized checkpoint" in capsys.readouterr().err


def test_resume_after_completion_changes_nothing(trained, capsys):
    out, argv = trained
    if not (out / "last.pt").exists():
        pytest.skip("needs test_train_writes_run_directory_and_json")
    before = load_checkpoint(out / "model.pt")["state_dict"]
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    after = load_checkpoint(out / "model.pt")["state_dict"]
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_eval_quantized_checkpoint_uses_fakequant(tmp_path, capsys, fashion_dir):
    import qcnn
    from qcnn.checkpoint import save_model
    from qcnn.data import get_data
    from qcnn.models import build_model
    from qcnn.train import evaluate

    data = get_data("fashion-mnist", data_dir=fashion_dir, batch_size=500, calib_size=256, augment=False)
    torch.manual_seed(0)
    q = qcnn.quantize(build_model("lenet5", in_channels=1), qcnn.Recipe(w_bits=4, a_bits=4)).eval()
    with qcnn.calibrating(q):
        for x, _ in data.calib:
            q(x)
    save_model(tmp_path / "q.pt", q, {"name": "lenet5", "in_channels": 1, "kwargs": {"image_size": 28}},
               recipe=qcnn.Recipe(w_bits=4, a_bits=4))
    expected = evaluate(q, data.test.take(1000))["top1"]
    assert main(["eval", "--checkpoint", str(tmp_path / "q.pt"), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--limit-test", "1000", "--json"]) == 0
    figures = _last_json(capsys)
    assert figures["engine"] == "fakequant" and figures["top1"] == pytest.approx(expected, abs=1e-4)
    # fused kernels give the eager fake-quant forward bit for bit; the compiled model to float rounding
    assert main(["eval", "--checkpoint", str(tmp_path / "q.pt"), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--limit-test", "1000", "--kernels", "fused", "--json"]) == 0
    assert _last_json(capsys)["top1"] == figures["top1"]
    assert main(["eval", "--checkpoint", str(tmp_path / "q.pt"), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--limit-test", "1000", "--compile", "--json"]) == 0
    assert _last_json(capsys)["top1"] == pytest.approx(figures["top1"], abs=0.3)
    assert main(["eval", "--checkpoint", str(tmp_path / "q.pt"), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--engine", "integer", "--compile"]) == 2
    assert "--compile / --kernels apply to the float and fakequant engines" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "q.pt"), "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--engine", "float"]) == 2
    assert "is quantized" in capsys.readouterr().err
    m, info = load_model(tmp_path / "q.pt")
    assert info["recipe"]["a_bits"] == 4


@pytest.mark.slow
def test_eval_shared_resnet20_on_jpeg_slice(capsys, cifar_zip, weights_dir):
    assert main(["eval", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(cifar_zip),
                 "--checkpoint", str(weights_dir / "resnet20-12fca82f.th"), "--limit-test", "500",
                 "--batch-size", "250", "--json"]) == 0
    figures = _last_json(capsys)
    assert figures["images"] == 500 and 74.0 <= figures["top1"] <= 88.0


def test_cli_errors_name_the_bad_value(capsys, fashion_dir):
    assert main(["train", "--model", "lenet6", "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                 "--limit-train", "100"]) == 2
    assert "unknown model 'lenet6'" in capsys.readouterr().err
    assert main(["eval", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                 "--checkpoint", "/nonexistent.pt"]) == 2
    assert "/nonexistent.pt" in capsys.readouterr().err


def test_models_command_lists_the_zoo(capsys):
    assert main(["models", "--json"]) == 0
    listed = _last_json(capsys)
    assert {"lenet5", "resnet20", "resnet56", "vgg_small", "vgg7"} <= set(listed["models"])
    assert main(["models"]) == 0
    assert "tv:<name>" in capsys.readouterr().out


def test_an_earlier_run_is_never_overwritten_or_resumed_with_other_settings(trained, capsys):
    out, argv = trained
    if not (out / "model.pt").exists():
        pytest.skip("needs test_train_writes_run_directory_and_json")
    before = (out / "model.pt").read_bytes(), (out / "config.json").read_text()
    capsys.readouterr()
    assert main(argv) == 2  # the same command again, without --resume
    assert "already holds a run" in capsys.readouterr().err
    seed = argv + ["--resume", "--seed", "7"]
    assert main(seed) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed: 0 -> 7" in err
    limit = [a if a != "3000" else "2000" for a in argv] + ["--resume"]
    assert main(limit) == 2
    assert "limit_train: 3000 -> 2000" in capsys.readouterr().err
    assert ((out / "model.pt").read_bytes(), (out / "config.json").read_text()) == before


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "lenet5", "--dataset", "fashion-mnist", "--test-images", "0"], "--test-images: 0 must"),
    (["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--train-images", "0"], "--train-images: 0"),
    (["eval", "--model", "lenet5", "--dataset", "fashion-mnist", "--limit-test", "0"], "--limit-test: 0 must"),
    (["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--limit-train", "0"], "--limit-train: 0"),
    (["bench", "--out", "x", "--limit-train", "0"], "--limit-train: 0"),
    (["qat", "--model", "lenet5", "--dataset", "fashion-mnist", "--limit-train", "-5"], "--limit-train: -5"),
    (["qat", "--model", "lenet5", "--dataset", "fashion-mnist", "--limit-test", "x"], "'x' is not an integer"),
    (["ptq", "--model", "lenet5", "--dataset", "fashion-mnist", "--calib-images", "0"], "--calib-images: 0"),
    (["bench", "--workers", "0"], "--workers: 0 must be >= 1"),
    (["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--batch-size", "0"], "--batch-size: 0"),
])
def test_counts_of_zero_or_less_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_train_with_zero_epochs_is_refused(tmp_path, capsys):
    rc = main(["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--epochs", "0",
               "--out", str(tmp_path / "r")])
    assert rc == 2 and "--epochs 0 trains nothing" in capsys.readouterr().err
    assert not (tmp_path / "r" / "model.pt").exists()


def test_width_with_a_qcnn_checkpoint_is_refused(trained, capsys):
    out, _ = trained
    if not (out / "model.pt").exists():
        pytest.skip("needs test_train_writes_run_directory_and_json")
    rc = main(["eval", "--checkpoint", str(out / "model.pt"), "--dataset", "fashion-mnist", "--width", "2",
               "--test-images", "100"])
    assert rc == 2 and "--width 2 does not apply" in capsys.readouterr().err

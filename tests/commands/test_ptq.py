"""``qcnn ptq`` end to end on ResNet-20 / CIFAR-10 (small slices), checkpoint re-evaluated by ``qcnn eval``,
and clear errors for bad flags."""

from __future__ import annotations

import json

import pytest

from qcnn.cli import main


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_ptq_then_eval_same_accuracy(cifar_zip, weights_dir, tmp_path, capsys):
    out = tmp_path / "ptq"
    common = ["--dataset", "cifar10", "--data-dir", str(cifar_zip), "--batch-size", "200"]
    rc = main(["ptq", "--model", "resnet20", "--checkpoint", str(weights_dir / "resnet20-12fca82f.th"), *common,
               "--method", "qcode", "--per-tensor", "--w-bits", "8", "--a-bits", "8", "--calib", "minmax",
               "--first-last", "same", "--calib-images", "200", "--limit-test", "400", "--out", str(out), "--json"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert res["method"] == "qcode" and res["float_top1"] > 70 and abs(res["drop"]) <= 3.0
    assert res["per_channel"] is False
    rows = json.loads((out / "layers.json").read_text())
    assert len(rows) == 20 and all(r["w_bits"] == 8 and r["a_bits"] == 8 for r in rows)
    assert rows[0]["name"] == "conv1" and rows[0]["w_grid"].startswith("fl=")
    assert all(r["w_sqnr_db"] > 25 for r in rows)
    assert "| conv1 |" in (out / "layers.md").read_text()
    rc = main(["eval", "--checkpoint", str(out / "model.pt"), *common, "--limit-test", "400", "--json"])
    assert rc == 0
    assert _last_json(capsys.readouterr().out)["top1"] == res["top1"]


def test_pot_align_is_recorded_and_rebuilt_by_eval(cifar_zip, weights_dir, tmp_path, capsys):
    """``--pot-align`` on per-tensor QCode: the step and the pairs it aligned are in the figures, and the
    checkpoint (weights and biases rescaled) gives the same top-1 in ``qcnn eval``."""
    out = tmp_path / "ptq"
    common = ["--dataset", "cifar10", "--data-dir", str(cifar_zip), "--batch-size", "200"]
    rc = main(["ptq", "--model", "resnet20", "--checkpoint", str(weights_dir / "resnet20-12fca82f.th"), *common,
               "--method", "qcode", "--per-tensor", "--w-bits", "8", "--a-bits", "4", "--calib", "mse",
               "--first-last", "same", "--calib-images", "200", "--limit-test", "400", "--pot-align",
               "--out", str(out), "--json"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert res["ptq_steps"] == ["pot_align"]
    details = res["ptq_step_details"]["pot_align"]
    assert details["pairs"] == 9  # conv1 -> ReLU -> conv2 of each residual block
    assert details["streams"] == 1  # the residual stream: stem and block outputs, pads and adds, the classifier
    rc = main(["eval", "--checkpoint", str(out / "model.pt"), *common, "--limit-test", "400", "--json"])
    assert rc == 0
    assert _last_json(capsys.readouterr().out)["top1"] == res["top1"]


def test_ptq_steps_are_recorded_and_rebuilt_by_eval(cifar_zip, weights_dir, tmp_path, capsys):
    """``--equalize --bias-correction --round adaround --mixed-precision``: the steps are in the printed
    figures and the checkpoint's recipe, and ``qcnn eval`` of the checkpoint gives the same top-1 (the
    equalized layers, learned rounding and corrected biases are rebuilt exactly)."""
    out = tmp_path / "ptq"
    common = ["--dataset", "cifar10", "--data-dir", str(cifar_zip), "--batch-size", "200"]
    rc = main(["ptq", "--model", "resnet20", "--checkpoint", str(weights_dir / "resnet20-12fca82f.th"), *common,
               "--method", "uniform", "--per-channel", "--w-bits", "8", "--a-bits", "8", "--calib", "mse",
               "--first-last", "8bit", "--calib-images", "128", "--limit-test", "400", "--equalize",
               "--bias-correction", "--round", "adaround", "--round-iterations", "20", "--mixed-precision", "0.7x",
               "--mp-candidates", "8,4", "--out", str(out), "--json"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert res["ptq_steps"] == ["equalize", "absorb_bias", "adaround", "bias_correction:empirical",
                                "mixed_precision:0.7x"]
    assert set(res["ptq_step_details"]) >= {"absorb_bias", "adaround", "bias_correction", "mixed_precision"}
    assert abs(res["drop"]) <= 5.0
    rows = {r["name"]: r for r in json.loads((out / "layers.json").read_text())}
    assert rows["conv1"]["w_bits"] == 8 and rows["linear"]["w_bits"] == 8  # the 8bit first/last policy holds
    assert any(r["w_bits"] == 4 for r in rows.values())
    assert (out / "pareto.png").stat().st_size > 0 and "| layer1.0.conv1 |" in (out / "mixed_precision.md").read_text()
    rc = main(["eval", "--checkpoint", str(out / "model.pt"), *common, "--test-images", "400", "--json"])  # former flag
    assert rc == 0
    assert _last_json(capsys.readouterr().out)["top1"] == res["top1"]


@pytest.mark.parametrize("flags,message", [
    (["--round", "sideways"], "'sideways'"),
    (["--bias-correction", "guess"], "'guess'"),
])
def test_bad_choices(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ptq", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", "/nonexistent", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--round-drop-prob", "1.5"], "round_drop_prob=1.5"),
    (["--round-act-lr", "-1"], "round_act_lr=-1.0"),
    (["--round-lr", "0"], "round_lr=0.0"),
    (["--round-act-lr", "inf"], "round_act_lr=inf"),
    (["--mixed-precision", "lots"], "'lots'"),
    (["--mp-candidates", "8,x"], "--mp-candidates '8,x'"),
    (["--w-bits", "0"], "w_bits=0"),
    (["--a-bits", "33"], "a_bits=33"),
    (["--calib", "entropy9"], "'entropy9'"),
    (["--method", "qkode"], "'qkode'"),
])
def test_bad_flags(flags, message, capsys):
    rc = main(["ptq", "--model", "resnet20", "--dataset", "cifar10", "--data-dir", "/nonexistent", *flags])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_key(tmp_path, capsys):
    r = tmp_path / "r.yaml"
    r.write_text("method: qcode\nwbits: 4\n")
    rc = main(["ptq", "--model", "resnet20", "--dataset", "cifar10", "--recipe", str(r)])
    assert rc == 2
    assert "wbits" in capsys.readouterr().err

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
               "--method", "qcode", "--w-bits", "8", "--a-bits", "8", "--calib", "minmax", "--first-last", "same",
               "--calib-images", "200", "--limit-test", "400", "--out", str(out), "--json"])
    assert rc == 0
    res = _last_json(capsys.readouterr().out)
    assert res["method"] == "qcode" and res["float_top1"] > 70 and abs(res["drop"]) <= 3.0
    rows = json.loads((out / "layers.json").read_text())
    assert len(rows) == 20 and all(r["w_bits"] == 8 and r["a_bits"] == 8 for r in rows)
    assert rows[0]["name"] == "conv1" and rows[0]["w_grid"].startswith("fl=")
    assert all(r["w_sqnr_db"] > 25 for r in rows)
    assert "| conv1 |" in (out / "layers.md").read_text()
    rc = main(["eval", "--checkpoint", str(out / "model.pt"), *common, "--test-images", "400", "--json"])
    assert rc == 0
    assert _last_json(capsys.readouterr().out)["top1"] == res["top1"]


@pytest.mark.parametrize("flags,message", [
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

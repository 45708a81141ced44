"""Outside a terminal (as under pytest: stderr is captured, not a tty) a run reports as it goes: one plain line
per epoch on stderr, and a line for each finished post-training step, calibration included; stdout keeps the
figures (its last line the JSON)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from qcnn.cli import main
from qcnn.train import progress_mode

EPOCH = re.compile(r"^epoch (\d+)/(\d+): train loss ([\d.]+) top1 ([\d.]+) \| test loss ([\d.]+) top1 ([\d.]+) "
                   r"\(([\d.]+) s\)$")


@pytest.fixture
def progress_on(monkeypatch):
    monkeypatch.delenv("QCNN_PROGRESS", raising=False)


def test_progress_mode_follows_the_terminal(progress_on, monkeypatch):
    assert progress_mode() == "lines"  # captured stderr is no tty
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_mode() == "bar"
    monkeypatch.setenv("QCNN_PROGRESS", "0")
    assert progress_mode() == "off"


def test_qat_prints_one_line_per_epoch_to_stderr(progress_on, fashion_dir, tmp_path, capfd):
    out = tmp_path / "run"
    assert main(["qat", "--recipe", "lsq", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-dir",
                 str(fashion_dir), "--batch-size", "64", "--epochs", "2", "--limit-train", "256", "--limit-test",
                 "128", "--device", "cpu", "--out", str(out), "--json"]) == 0
    captured = capfd.readouterr()
    err = captured.err.splitlines()
    epochs = [EPOCH.match(line) for line in err if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(epochs), err
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for m, h in zip(epochs, history):
        assert (int(m[1]), int(m[2])) == (h["epoch"], 2)
        assert float(m[3]) == pytest.approx(h["train_loss"], abs=1e-4)
        assert float(m[6]) == pytest.approx(h["test_top1"], abs=0.01)
        assert float(m[7]) == pytest.approx(h["seconds"], abs=0.06)
    calib = [i for i, line in enumerate(err) if "calibrating on 1024 images" in line]
    start = [i for i, line in enumerate(err) if line == "training 2 epoch(s) of 4 steps (batch 64, cpu)"]
    assert len(calib) == len(start) == 1 and calib[0] < start[0] < err.index(epochs[0][0])
    assert not any(line.startswith("epoch ") for line in captured.out.splitlines())
    assert json.loads(captured.out.splitlines()[-1])["epochs"] == 2


def test_ptq_reports_the_end_of_calibration(progress_on, fashion_dir, capfd):
    assert main(["ptq", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                 "--calib-images", "128", "--limit-test", "128", "--json"]) == 0
    err = capfd.readouterr().err.splitlines()
    assert any(re.fullmatch(r"\s*ptq step calibrate: [\d.]+ s \([\d.]+ s CPU\)", line) for line in err), err


def test_no_progress_with_qcnn_progress_0(monkeypatch, fashion_dir, capfd):
    monkeypatch.setenv("QCNN_PROGRESS", "0")
    assert main(["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--data-dir", str(fashion_dir),
                 "--epochs", "1", "--limit-train", "128", "--batch-size", "64", "--json"]) == 0
    assert capfd.readouterr().err == ""

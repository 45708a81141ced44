"""``qcnn datasets``: found / missing datasets, counts from headers, and how to get missing ones."""

from __future__ import annotations

import json

from qcnn.cli import main
from qcnn.data import datasets


def test_lists_found_and_missing(monkeypatch, tmp_path, fashion_dir, capsys):
    monkeypatch.delenv("QCNN_DATA", raising=False)
    monkeypatch.setenv("QCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", [fashion_dir.parent])
    assert main(["datasets", "--json"]) == 0
    out = capsys.readouterr().out
    infos = {d["name"]: d for d in json.loads(out.strip().splitlines()[-1])}
    assert list(infos) == ["mnist", "fashion-mnist", "cifar10", "imagenet", "imagefolder"]
    f = infos["fashion-mnist"]
    assert f["found"] and (f["train"], f["test"]) == (60000, 10000) and f["origin"] == "system"
    assert f["bytes"] > 25_000_000
    assert not infos["imagenet"]["found"] and "image-net.org" in infos["imagenet"]["how_to_get"]
    assert "download: not attempted" in infos["mnist"]["looked_in"]
    assert "NOT FOUND" in out and "60000 train / 10000 test" in out


def test_cifar_zip_counts(cifar_zip, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCNN_CACHE", str(tmp_path / "cache"))
    assert main(["datasets", "--dataset", "cifar", "--data-dir", str(cifar_zip), "--json"]) == 0
    out = capsys.readouterr().out
    (info,) = json.loads(out.strip().splitlines()[-1])
    assert (info["name"], info["format"], info["train"], info["test"]) == ("cifar10", "zip", 50000, 10000)
    assert info["decoded_cache"] is None and "none yet" in out


def test_unknown_dataset_is_an_error(capsys):
    assert main(["datasets", "--dataset", "svhn"]) == 2
    assert "unknown dataset 'svhn'" in capsys.readouterr().err


def test_bench_iterates_one_full_epoch(fashion_dir, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", [fashion_dir.parent])
    monkeypatch.delenv("QCNN_DATA", raising=False)
    assert main(["datasets", "--dataset", "fashion-mnist", "--bench", "--batch-size", "1000", "--json"]) == 0
    out = capsys.readouterr().out
    (info,) = json.loads(out.strip().splitlines()[-1])
    b = info["bench"]
    assert b["train_images"] == 60000 and b["device"] == "cpu" and b["train_images_per_s"] > 0
    assert "bench: first load" in out


def test_missing_data_dir_and_missing_dataset_fail(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCNN_CACHE", str(tmp_path / "cache"))
    assert main(["datasets", "--data-dir", str(tmp_path / "nonexistent")]) == 2
    assert f"--data-dir {tmp_path / 'nonexistent'}: no such file or directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("QCNN_DATA", raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", [empty])
    assert main(["datasets", "--dataset", "imagenet", "--data-dir", str(empty)]) == 1  # asked for, not found
    assert "NOT FOUND" in capsys.readouterr().out

"""The ``.npz`` + ``.json`` format: files written by the engine before the package split load and run alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qcnn.integer import IntegerModel
from qcnn.integer.onnx_export import OrtModel, to_onnx

DATA = Path(__file__).parent / "data"
OLD_FILES = ["v1_deploy_int64", "v1_fqn4_int32_acc"]  # see data/README.md


def _expected(name: str):
    with np.load(DATA / f"{name}.expected.npz") as ref:
        x = torch.from_numpy(ref["x"])
        logits = torch.from_numpy(ref["logits"])
        codes = {k[len("code:"):]: torch.from_numpy(ref[k]).to(torch.int64) for k in ref.files
                 if k.startswith("code:")}
    return x, logits, codes


@pytest.mark.parametrize("name", OLD_FILES)
def test_files_of_the_old_engine_load_and_compute_the_same_codes(name):
    im = IntegerModel.load(DATA / f"{name}.json")
    x, logits, want = _expected(name)
    out, codes = im.run(x, record=True)
    assert torch.equal(out, logits)
    assert set(codes) == set(want) and want
    for p, c in want.items():
        assert torch.equal(codes[p], c), p


@pytest.mark.parametrize("name", OLD_FILES)
def test_saving_a_loaded_old_file_writes_the_same_files(name, tmp_path):
    im = IntegerModel.load(DATA / f"{name}.npz")
    npz, js = im.save(tmp_path / name)
    assert js.read_text() == (DATA / f"{name}.json").read_text()
    with np.load(npz) as new, np.load(DATA / f"{name}.npz") as old:
        assert new.files == old.files
        for k in old.files:
            assert new[k].dtype == old[k].dtype and np.array_equal(new[k], old[k]), k


def test_old_file_exports_to_the_bit_exact_integer_onnx_form():
    im = IntegerModel.load(DATA / "v1_deploy_int64")
    x, logits, _ = _expected("v1_deploy_int64")
    assert torch.equal(OrtModel(to_onnx(im, form="integer"), threads=1)(x), logits)


def test_foreign_and_newer_files_are_refused(tmp_path):
    for ext in (".json", ".npz"):
        shutil.copy(DATA / f"v1_deploy_int64{ext}", tmp_path / f"m{ext}")
    desc = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**desc, "version": 2}))
    with pytest.raises(ValueError, match="newer"):
        IntegerModel.load(tmp_path / "m")
    (tmp_path / "m.json").write_text(json.dumps({**desc, "format": "other"}))
    with pytest.raises(ValueError, match="not a qcnn integer model"):
        IntegerModel.load(tmp_path / "m")

"""load_weights: every accepted checkpoint shape, prefixes, and errors that name the keys."""

from __future__ import annotations

import pytest
import torch

from qcnn.checkpoint import save_atomic, save_model
from qcnn.models import build_model, extract_state_dict, load_weights


@pytest.fixture
def lenet():
    torch.manual_seed(0)
    return build_model("lenet5", in_channels=1)


def _fresh():
    torch.manual_seed(1)
    return build_model("lenet5", in_channels=1)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "module", "model", "compiled"])
def test_accepted_layouts(tmp_path, lenet, wrap):
    sd = lenet.state_dict()
    obj = {"raw": sd, "state_dict": {"state_dict": sd, "best_prec1": 90.0},
           "module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
           "model": {"model": sd, "epoch": 3},
           "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()}}[wrap]
    save_atomic(obj, tmp_path / "w.pt")
    m = load_weights(_fresh(), tmp_path / "w.pt")
    for k, v in m.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_qcnn_model_checkpoint(tmp_path, lenet):
    save_model(tmp_path / "m.pt", lenet, {"name": "lenet5", "in_channels": 1})
    m = load_weights(_fresh(), tmp_path / "m.pt")
    assert torch.equal(m.fc3.weight, lenet.fc3.weight)


def test_missing_num_batches_tracked_is_tolerated(lenet):
    sd = {k: v for k, v in lenet.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_weights(_fresh(), sd)


def test_errors_name_the_keys(lenet):
    sd = dict(lenet.state_dict())
    del sd["fc2.bias"]
    sd["fc9.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys \[fc2\.bias\]; unexpected keys \[fc9\.weight\]"):
        load_weights(_fresh(), sd)
    sd = dict(lenet.state_dict())
    sd["fc3.weight"] = torch.zeros(5, 84)
    with pytest.raises(ValueError, match=r"shape mismatches \[fc3\.weight \(checkpoint \(5, 84\), model \(10, 84\)\)"):
        load_weights(_fresh(), sd)
    with pytest.raises(ValueError, match=r"holds no state_dict \(top-level keys: \['epoch', 'optim'\]\)"):
        extract_state_dict({"epoch": 1, "optim": {}})
    with pytest.raises(ValueError, match="not a state_dict"):
        extract_state_dict([1, 2])


def test_failed_load_leaves_model_untouched(lenet):
    m = _fresh()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sd = dict(lenet.state_dict())
    sd["fc3.weight"] = torch.zeros(5, 84)
    with pytest.raises(ValueError):
        load_weights(m, sd)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])

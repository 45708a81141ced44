"""Checkpoints: atomic writes, refusal of corrupted / non-tensor files, qcnn model round trips."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import qcnn
from qcnn.checkpoint import MODEL_FORMAT, load_checkpoint, load_model, save_atomic, save_model
from qcnn.models import build_model


class _Payload:
    """Unpickling this calls ``open(marker, "w")``, i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_save_atomic_replaces_and_leaves_no_temp_file(tmp_path):
    p = tmp_path / "sub" / "c.pt"
    save_atomic({"a": torch.arange(3)}, p)
    save_atomic({"a": torch.arange(5)}, p)
    assert torch.equal(load_checkpoint(p)["a"], torch.arange(5))
    assert os.listdir(p.parent) == ["c.pt"]


def test_failed_save_keeps_the_old_file(tmp_path):
    p = tmp_path / "c.pt"
    save_atomic({"a": torch.ones(2)}, p)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        save_atomic({"a": lambda: 0}, p)
    assert torch.equal(load_checkpoint(p)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_pickled_object_is_refused_without_executing_it(tmp_path):
    marker = tmp_path / "executed"
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, p)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(p)
    assert not marker.exists()
    # the same with a plain pickle file (legacy format)
    p2 = tmp_path / "evil.pkl"
    p2.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(p2)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused"):
        qcnn.models.load_weights(build_model("lenet5", in_channels=1), p)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_checkpoint_is_refused(tmp_path, damage):
    p = tmp_path / "c.pt"
    save_atomic({"w": torch.randn(1000)}, p)
    data = p.read_bytes()
    p.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"checkpoint '.*c\.pt' was refused"):
        load_checkpoint(p)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint("/nonexistent/x.pt")


def test_float_model_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_model("resnet20", width=0.5).eval()
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "width": 0.5}
    save_model(tmp_path / "m.pt", m, arch, metrics={"top1": 12.5})
    raw = load_checkpoint(tmp_path / "m.pt")
    assert raw["format"] == MODEL_FORMAT and raw["recipe"] is None
    m2, info = load_model(tmp_path / "m.pt")
    assert info["arch"] == {**arch, "kwargs": {}} and info["metrics"] == {"top1": 12.5}
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(m(x), m2(x))
    assert not m2.training


def test_quantized_model_round_trip_keeps_the_quantized_forward(tmp_path):
    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1).eval()
    recipe = qcnn.Recipe(method="uniform", w_bits=4, a_bits=4)
    q = qcnn.quantize(m, recipe).eval()
    x = torch.randn(16, 1, 28, 28)
    with qcnn.calibrating(q):
        q(x)
    save_model(tmp_path / "q.pt", q, {"name": "lenet5", "in_channels": 1}, recipe=recipe)
    q2, info = load_model(tmp_path / "q.pt")
    assert info["recipe"]["w_bits"] == 4
    y, y2 = q(x), q2(x)
    assert torch.equal(y, y2)
    assert not torch.allclose(y2, m(x), atol=1e-3)  # really quantized, not the float forward
    # 4-bit weights (first/last layers 8 bit by default): at most 16 distinct values per output channel
    w = q2.conv2.quantized_weight()
    assert max(len(torch.unique(w[i])) for i in range(w.shape[0])) <= 16


def test_plain_state_dict_needs_arch(tmp_path, weights_dir):
    path = weights_dir / "resnet20-12fca82f.th"
    with pytest.raises(ValueError, match="without architecture"):
        load_model(path)
    m, info = load_model(path, arch={"name": "resnet20"})
    assert info["format"] == "state_dict" and info["recipe"] is None
    raw = load_checkpoint(path)["state_dict"]
    assert torch.equal(m.linear.weight, raw["module.linear.weight"])
    with pytest.raises(ValueError, match="missing keys"):
        load_model(path, arch={"name": "resnet32"})


def test_bad_arch_is_named(tmp_path):
    m = build_model("lenet5")
    with pytest.raises(ValueError, match=r"unknown arch key\(s\) \['depth'\]"):
        save_model(tmp_path / "m.pt", m, {"name": "lenet5", "depth": 3})
    save_model(tmp_path / "m.pt", m, {"name": "lenet5"})
    with pytest.raises(ValueError, match="holds a 'lenet5' model, not 'resnet20'"):
        load_model(tmp_path / "m.pt", arch={"name": "resnet20"})


def _flip_a_weight_bit(path):
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.file_size // 2] ^= 0x04  # inside the largest tensor's bytes (stored, not compressed)
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_is_refused_with_the_file_named(tmp_path):
    import torch
    from torch import nn

    from qcnn.checkpoint import load_checkpoint, save_model

    p = tmp_path / "model.pt"
    save_model(p, nn.Linear(64, 64), {"name": "lenet5"})
    load_checkpoint(p)  # intact: loads
    _flip_a_weight_bit(p)
    # torch.load alone would hand back a different weight without a word
    assert torch.load(p, weights_only=True)["state_dict"]["weight"].shape == (64, 64)
    with pytest.raises(ValueError, match=r"model\.pt.*corrupted.*CRC-32"):
        load_checkpoint(p)


def test_a_directory_given_as_checkpoint_points_to_its_model(tmp_path):
    from torch import nn

    from qcnn.checkpoint import load_checkpoint, save_model

    save_model(tmp_path / "model.pt", nn.Linear(2, 2), {"name": "lenet5"})
    with pytest.raises(ValueError, match=r"is a directory.*model\.pt"):
        load_checkpoint(tmp_path)


class _UserNet(torch.nn.Module):
    """A network qcnn's zoo does not know: conv-BN-ReLU, a residual add, global pooling, a classifier."""

    def __init__(self, width=8):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())
        self.body = torch.nn.Conv2d(width, width, 3, padding=1)
        self.head = torch.nn.Linear(width, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.body(y))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("method", ["uniform", "pact", "lsq"])
def test_user_model_round_trip_onto_a_fresh_instance(tmp_path, method):
    torch.manual_seed(0)
    recipe = qcnn.load_recipe(method).replace(w_bits=4, a_bits=4)
    q = qcnn.quantize(_UserNet().eval(), recipe)
    x = torch.randn(8, 3, 16, 16)
    with qcnn.calibrating(q):
        q(x)
    q.eval()
    save_model(tmp_path / "q.pt", q, recipe=recipe)
    with pytest.raises(ValueError, match=r"_UserNet model, not a qcnn zoo architecture.*model=_UserNet"):
        load_model(tmp_path / "q.pt")
    torch.manual_seed(1)  # other random weights: everything must come from the file
    fresh = _UserNet()
    q2, info = load_model(tmp_path / "q.pt", model=fresh)
    assert info["model_class"] == "_UserNet" and info["arch"] is None
    assert torch.equal(q2(x), q(x))
    assert not torch.equal(fresh.head.weight, q2.head.weight)  # the user's instance is left as it was
    with pytest.raises(ValueError, match=r"does not fit _UserNet: shape mismatches \[stem.0.weight"):
        load_model(tmp_path / "q.pt", model=_UserNet(width=4))
    with pytest.raises(TypeError, match="model= must be the float nn.Module"):
        load_model(tmp_path / "q.pt", model="resnet18")

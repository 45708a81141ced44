"""Compressed model format: bit packing, each sparsity layout, exact model round trip, sizes, the command."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from qcnn.compress import (
    FORMAT,
    compress_model,
    decode_weights,
    encode_codebook,
    load_compressed,
    pack_bits,
    read_compressed,
    unpack_bits,
)
from qcnn.methods import calibrate, quantize
from qcnn.models import build_model
from qcnn.recipes import Recipe
from qcnn.transform import quantized_layers

ARCH = {"name": "lenet5", "in_channels": 1}


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8, 11])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    v = rng.integers(0, 2**bits, size=1001)
    buf = pack_bits(v, bits)
    assert buf.size == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_bits(buf, bits, 1001), v)


def test_pack_refuses_out_of_range():
    with pytest.raises(ValueError, match="2-bit"):
        pack_bits(np.array([4]), 2)


def _roundtrip(w):
    desc, payload = encode_codebook(w)
    desc.update(name="x", key="x.weight", shape=list(w.shape), offset=0, nbytes=len(payload))
    obj = {"layers": [desc], "blob": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    return desc, decode_weights(obj)["x.weight"]


@pytest.mark.parametrize("zero_fraction,layout", [(0.0, "dense"), (0.6, "bitmask"), (0.995, "csr")])
def test_each_layout_round_trips_bit_exactly(zero_fraction, layout):
    torch.manual_seed(0)
    levels = torch.tensor([-0.731, -0.2113, 0.0917, 0.55, 1.3])
    w = levels[torch.randint(0, 5, (64, 32, 3, 3))]
    w[torch.rand(w.shape) < zero_fraction] = 0.0
    desc, back = _roundtrip(w)
    assert desc["encoding"] == layout
    assert torch.equal(back, w)


def test_bitmask_size_is_mask_plus_codes_plus_codebook():
    torch.manual_seed(1)
    lv = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    w = lv[torch.randint(0, 4, (4000,))]
    w[:2000] = 0.0  # half zero: 4 non-zero levels need 2 bits
    desc, _ = _roundtrip(w)
    assert desc["encoding"] == "bitmask"
    # 5 fp32 levels (zero included) + 4000-bit mask + 2000 x 2-bit codes
    assert desc["nbytes"] == 5 * 4 + 500 + 500


def _clipq_model():
    torch.manual_seed(0)
    r = Recipe.from_dict({"method": "clipq", "w_bits": 3, "a_bits": None, "first_last": "same",
                          "params": {"p": 0.6, "layers": {"fc1": [0.8, 2]}}})
    return quantize(build_model("lenet5", in_channels=1), r).eval(), r


def test_model_round_trip_is_exact(tmp_path):
    q, r = _clipq_model()
    stats = compress_model(q, tmp_path / "m.qcz", arch=ARCH, recipe=r.to_dict())
    # the file is a weights_only-loadable dict of tensors and plain containers
    obj = torch.load(tmp_path / "m.qcz", weights_only=True)
    assert obj["format"] == FORMAT and obj["blob"].dtype == torch.uint8
    back, info = load_compressed(tmp_path / "m.qcz")
    with torch.no_grad():
        for name, m in quantized_layers(q):
            assert torch.equal(back.get_submodule(name).quantized_weight(), m.quantized_weight())
        x = torch.randn(8, 1, 28, 28)
        assert torch.equal(back(x), q(x))
    assert info["arch"]["name"] == "lenet5"
    # sizes: weight bytes are the layers' payloads; the ratio is against 4 bytes per weight
    n = sum(m.weight.numel() for _, m in quantized_layers(q))
    assert stats["weight_fp32_bytes"] == 4 * n
    assert stats["weight_bytes"] == obj["blob"].numel()
    assert stats["weight_ratio"] == pytest.approx(4 * n / obj["blob"].numel())
    assert stats["weight_ratio"] > 14  # ~60-80% zeros, 2-3 bit codes
    assert stats["file_bytes"] == (tmp_path / "m.qcz").stat().st_size


def test_uniform_model_uses_affine_codes(tmp_path):
    torch.manual_seed(0)
    r = Recipe.from_dict({"method": "uniform", "w_bits": 4, "a_bits": 8, "first_last": "same"})
    q = quantize(build_model("lenet5", in_channels=1), r)
    calibrate(q, [(torch.randn(16, 1, 28, 28), None)])
    q.eval()
    stats = compress_model(q, tmp_path / "u.qcz", arch=ARCH, recipe=r.to_dict())
    assert {row["kind"] for row in stats["layers"]} == {"affine"}
    back, _ = load_compressed(tmp_path / "u.qcz")
    with torch.no_grad():
        for name, m in quantized_layers(q):
            assert torch.equal(back.get_submodule(name).quantized_weight(), m.quantized_weight())
        x = torch.randn(4, 1, 28, 28)
        assert torch.equal(back(x), q(x))


def test_not_a_compressed_file(tmp_path):
    torch.save({"format": "something"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a compressed qcnn model"):
        read_compressed(tmp_path / "x.pt")


def test_compress_command(tmp_path, capsys):
    from qcnn.checkpoint import save_model
    from qcnn.cli import main

    q, r = _clipq_model()
    save_model(tmp_path / "model.pt", q, ARCH, recipe=r)
    assert main(["compress", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "m.qcz"),
                 "--json"]) == 0
    out = capsys.readouterr().out
    assert "fc1" in out and "weight_ratio" in out
    back, _ = load_compressed(tmp_path / "m.qcz")
    assert torch.equal(back.fc1.quantized_weight(), q.fc1.quantized_weight())


def _bireal_model():
    from pathlib import Path

    torch.manual_seed(0)
    r = Recipe.from_yaml(Path(__file__).resolve().parents[1] / "recipes" / "bireal.yaml")
    q = quantize(build_model("bireal_resnet20"), r)
    with torch.no_grad():  # trained-looking BN statistics and affine parameters
        for m in q.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return q.eval(), r


def test_magnitude_aware_binary_weight_is_a_projection():
    # Q(Q(W)) = Q(W) bit for bit (s_o accumulated in float64): a model rebuilt from W_b alone is exact
    from qcnn.quant.binary import MagnitudeAwareBinaryWeight

    torch.manual_seed(0)
    for shape in [(16, 16, 3, 3), (64, 64, 3, 3), (120, 400), (84, 120), (6, 1, 5, 5)]:
        q = MagnitudeAwareBinaryWeight()
        wb = q(torch.randn(shape) * 0.05)
        assert torch.equal(q(wb), wb)


def test_bireal_model_packs_one_bit_per_binary_weight(tmp_path):
    from qcnn.quant.binary import MagnitudeAwareBinaryWeight

    q, r = _bireal_model()
    arch = {"name": "bireal_resnet20"}
    stats = compress_model(q, tmp_path / "b.qcz", arch=arch, recipe=r.to_dict())
    binary = {n: m for n, m in q.named_modules() if isinstance(getattr(m, "weight_quant", None),
                                                               MagnitudeAwareBinaryWeight)}
    assert len(binary) == 18
    rows = {row["name"]: row for row in stats["layers"]}
    n_bin = sum(m.weight.numel() for m in binary.values())
    code_bytes = 0
    for name, m in binary.items():
        row, n, c = rows[name], m.weight.numel(), m.weight.shape[0]
        assert (row["kind"], row["code_bits"], row["levels"]) == ("affine", 1, 2), row
        assert row["bytes"] == (n + 7) // 8 + 4 * c  # 1-bit codes + one fp32 scale per output channel
        code_bytes += row["bytes"]
    assert n_bin / 8 <= code_bytes < 1.1 * n_bin / 8
    # on disk: the binary layers take their code bytes instead of 4 bytes per weight, the rest is as in fp32
    rest_fp32 = stats["fp32_bytes"] - 4 * n_bin
    assert stats["file_bytes"] == (tmp_path / "b.qcz").stat().st_size
    assert stats["file_bytes"] < rest_fp32 + code_bytes + 8192
    assert stats["model_ratio"] > 10
    back, info = load_compressed(tmp_path / "b.qcz")
    assert info["arch"]["name"] == "bireal_resnet20"
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for name, m in binary.items():
            wb = back.get_submodule(name).quantized_weight()
            assert torch.equal(wb, m.quantized_weight())
            assert torch.allclose(wb.abs(), m.weight.abs().mean(dim=(1, 2, 3), keepdim=True).expand_as(wb),
                                  rtol=1e-6, atol=0)  # +-mean|W| per output channel
        assert torch.equal(back(x), q(x))


def test_compress_command_takes_a_bireal_checkpoint(tmp_path, capsys):
    from qcnn.checkpoint import load_model, save_model
    from qcnn.cli import main

    q, r = _bireal_model()
    save_model(tmp_path / "model.pt", q, {"name": "bireal_resnet20"}, recipe=r)
    assert main(["compress", "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "b.qcz"),
                 "--json", "--quiet"]) == 0
    assert "weight_ratio" in capsys.readouterr().out
    ref, _ = load_model(tmp_path / "model.pt")
    back, _ = load_compressed(tmp_path / "b.qcz")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), ref(x))


def test_a_flipped_bit_in_a_qcz_is_refused_with_the_file_named(tmp_path):
    """torch.load ignores the zip CRCs: a flipped bit in the packed codes would load as another model."""
    q, r = _clipq_model()
    path = tmp_path / "m.qcz"
    compress_model(q, path, arch=ARCH, recipe=r.to_dict())
    data = bytearray(path.read_bytes())
    blob_at = data.find(b"blob")  # the packed weight codes' member
    assert blob_at > 0
    i = blob_at + (len(data) - blob_at) // 3
    data[i] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*corrupted"):
        load_compressed(path)

"""Readers of the on-disk formats: IDX, CIFAR-10 binary and python batches, ImageFolder dirs and zips."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from qcnn.data import readers


def _idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


def test_idx_raw_and_gz_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    (tmp_path / "b.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(readers.read_idx(tmp_path / "a"), arr)
    assert np.array_equal(readers.read_idx(tmp_path / "b.gz"), arr)
    assert readers.idx_count(tmp_path / "b.gz") == 2


def test_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        readers.read_idx(tmp_path / "bad")
    arr = np.zeros((3, 2), np.uint8)
    (tmp_path / "short").write_bytes(_idx_bytes(arr)[:-1])
    with pytest.raises(ValueError, match="header says"):
        readers.read_idx(tmp_path / "short")


def test_fashion_mnist_idx_files(fashion_dir):
    x, y = readers.read_idx_split(fashion_dir, "test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.tolist()[:5] == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert y.bincount().tolist() == [1000] * 10


def _cifar_records(labels, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    rec = np.concatenate([np.array(labels, np.uint8)[:, None], img.reshape(len(labels), -1)], axis=1)
    return img, rec.tobytes()


def test_cifar_binary_batch_format(tmp_path):
    # the official layout: per record one label byte, then the R, G, B planes, each 32x32 row-major
    img1, b1 = _cifar_records([3, 0, 9], seed=1)
    img2, b2 = _cifar_records([7, 7], seed=2)
    (tmp_path / "data_batch_1.bin").write_bytes(b1)
    (tmp_path / "data_batch_2.bin").write_bytes(b2)
    x, y = readers.read_cifar_binary([tmp_path / "data_batch_1.bin", tmp_path / "data_batch_2.bin"])
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert y.tolist() == [3, 0, 9, 7, 7]
    assert torch.equal(x, torch.from_numpy(np.concatenate([img1, img2])))
    # pixel (row 1, col 2) of the green plane of record 0 sits at byte 1 + 1024 + 1*32 + 2
    assert x[0, 1, 1, 2].item() == b1[1 + 1024 + 32 + 2]


def test_cifar_binary_rejects_wrong_size(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(ValueError, match="3073-byte record"):
        readers.read_cifar_binary([tmp_path / "x.bin"])


def test_cifar_python_batch(tmp_path):
    img, _ = _cifar_records([1, 2], seed=3)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": img.reshape(2, -1), b"labels": [1, 2]}, f)
    x, y = readers.read_cifar_python([tmp_path / "data_batch_1"])
    assert torch.equal(x, torch.from_numpy(img)) and y.tolist() == [1, 2]


def _png(color, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_zip_round_robin_order(tmp_path):
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as z:
        for split, n in (("train", 3), ("test", 2)):
            for c, cls in enumerate(("b_cls", "a_cls")):
                for k in range(n):
                    z.writestr(f"top/{split}/{cls}/{k:04d}.png", _png((10 * c, k, 200)))
    index = readers.index_image_folder(path)
    assert index.prefix == "top" and index.classes == ["a_cls", "b_cls"]
    assert [c for _, c in index.splits["train"]] == [0, 1, 0, 1, 0, 1]
    x, y = readers.read_image_folder(index, "train")
    assert x.shape == (6, 3, 5, 6) and y.tolist() == [0, 1, 0, 1, 0, 1]
    # train/a_cls/0002.png is the 3rd image of class 0 -> position 4; its colour is (10, 2, 200)
    assert x[4, :, 0, 0].tolist() == [10, 2, 200]


def test_image_folder_mixed_sizes_is_an_error(tmp_path):
    for split in ("train", "test"):
        d = tmp_path / split / "c"
        d.mkdir(parents=True)
        (d / "0.png").write_bytes(_png((0, 0, 0), (4, 4)))
        (d / "1.png").write_bytes(_png((0, 0, 0), (5, 4)))
    index = readers.index_image_folder(tmp_path)
    with pytest.raises(ValueError, match="1.png is 5x4, expected 4x4"):
        readers.read_image_folder(index, "train")


def _two_split_zip(path, compression):
    with zipfile.ZipFile(path, "w", compression) as z:
        for split in ("train", "test"):
            for c, cls in enumerate(("x", "y")):
                z.writestr(f"{split}/{cls}/0.png", _png((c, 100, 7)))


def test_zip_stored_and_deflated_members_agree(tmp_path):
    _two_split_zip(tmp_path / "s.zip", zipfile.ZIP_STORED)
    _two_split_zip(tmp_path / "d.zip", zipfile.ZIP_DEFLATED)
    xs, ys = readers.read_image_folder(readers.index_image_folder(tmp_path / "s.zip"), "test")
    xd, yd = readers.read_image_folder(readers.index_image_folder(tmp_path / "d.zip"), "test")
    assert torch.equal(xs, xd) and ys.tolist() == yd.tolist() == [0, 1]
    assert xs[1, :, 2, 3].tolist() == [1, 100, 7]


def test_zip_corruption_is_detected(tmp_path):
    path = tmp_path / "s.zip"
    _two_split_zip(path, zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("train/y/0.png")
    pos = info.header_offset + 30 + len(info.filename) + 40  # a byte inside the PNG data
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC mismatch in train/y/0.png"):
        readers.read_image_folder(readers.index_image_folder(path), "train")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_python_batch_refuses_code_and_names_the_file(tmp_path, protocol):
    import pickle

    good = {b"data": (np.arange(2 * 3072) % 251).astype(np.uint8).reshape(2, 3072), b"labels": [3, 7],
            b"batch_label": b"x"}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(good, protocol=protocol))
    x, y = readers.read_cifar_python([tmp_path / "data_batch_1"])
    assert y.tolist() == [3, 7] and x.shape == (2, 3, 32, 32) and int(x[1, 0, 0, 0]) == 3072 % 251
    bad = tmp_path / "data_batch_2"
    bad.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=protocol))
    with pytest.raises(ValueError, match=r"data_batch_2.*posix\.system|data_batch_2.*os\.system"):
        readers.read_cifar_python([bad])
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3"):
        readers.read_cifar_python([tmp_path / "data_batch_3"])


@pytest.mark.parametrize("bad", [b"\xff\xd8\xff\xe0 not really a jpeg", b"GIF89a?", b""])
def test_a_corrupt_image_is_named(tmp_path, bad):
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as z:
        for split in ("train", "test"):
            for k in range(3):
                z.writestr(f"{split}/c/{k:04d}.png", _png((k, k, k)))
        z.writestr("train/c/0007.jpg", bad)
    index = readers.index_image_folder(path)
    with pytest.raises(ValueError, match=r"set\.zip.*train/c/0007\.jpg.*cannot be decoded"):
        readers.read_image_folder(index, "train")


@pytest.mark.parametrize("content", [b"\x00\x17random bytes" * 100, b"PK\x03\x04truncated"])
def test_a_zip_that_is_not_an_archive_is_named(tmp_path, content):
    from qcnn.data import get_data

    bad = tmp_path / "set.zip"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=r"set\.zip.*not a readable zip archive"):
        get_data("cifar10", data_dir=bad)

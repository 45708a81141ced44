"""get_data on the real files: Fashion-MNIST IDX and the CIFAR-10 JPEG zip; lookup order, errors, cache."""

from __future__ import annotations

import io
import time
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from qcnn.data import DATASETS, datasets, get_data, locate, readers


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $QCNN_DATA, no system datasets, no network: only what a test puts under tmp_path."""
    monkeypatch.delenv("QCNN_DATA", raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", [tmp_path / "system"])

    def offline(root):
        raise urllib.error.URLError("network unreachable")

    for spec in DATASETS.values():
        if spec.download is not None:
            monkeypatch.setattr(spec, "download", offline)
    return tmp_path


# ------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_mnist(fashion_dir):
    b = get_data("fashion-mnist", batch_size=500, calib_size=1000)
    assert str(fashion_dir) in b.source
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 28)
    assert b.train.images.shape == (60000, 1, 28, 28) and b.test.images.shape == (10000, 1, 28, 28)
    assert b.train.labels.bincount().tolist() == [6000] * 10
    assert b.test.labels.bincount().tolist() == [1000] * 10
    assert b.train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    assert len(b.train) == 120 and len(b.test) == 20 and len(b.calib) == 2
    # the published normalisation constants are the pixel statistics of the training set
    px = b.train.images.float() / 255
    assert b.mean == (0.2860,) and b.std == (0.3530,)
    assert abs(px.mean().item() - 0.2860) < 5e-4 and abs(px.std().item() - 0.3530) < 5e-4
    x, y = next(iter(b.test))
    assert x.shape == (500, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, (b.test.images[:500].float() / 255 - 0.2860) / 0.3530, atol=1e-5)
    assert b.train.pad == 2 and b.train.flip is False


def test_calib_split_is_fixed_tail_of_train(fashion_dir):
    a = get_data("fashion-mnist", seed=0, calib_size=300)
    b = get_data("fashion-mnist", seed=9, calib_size=300, exclude_calib=True)
    assert torch.equal(a.calib.images, a.train.images[-300:])
    assert torch.equal(a.calib.images, b.calib.images)
    assert b.train.num_samples == 60000 - 300 and a.train.num_samples == 60000
    assert torch.equal(b.train.images, a.train.images[:-300])
    xa = torch.cat([x for x, _ in a.calib])
    assert torch.equal(xa, a.calib.tensors()[0])  # no augmentation, stored order
    assert get_data("fashion-mnist", calib_size=0).calib is None
    every = get_data("fashion-mnist", calib_size=60000)  # a PTQ-only run may calibrate on the whole set
    assert torch.equal(every.calib.images, every.train.images) and every.calib.num_samples == 60000
    with pytest.raises(ValueError, match="calib_size=60000"):
        get_data("fashion-mnist", calib_size=60000, exclude_calib=True)
    with pytest.raises(ValueError, match="calib_size=60001"):
        get_data("fashion-mnist", calib_size=60001)


def test_subset_helpers(fashion_dir):
    from qcnn.data import subset

    b = get_data("fashion-mnist", batch_size=64)
    small = subset(b, 200)
    assert small.train.num_samples == 200 and small.test.num_samples == 200 and small.calib.num_samples == 200
    assert torch.equal(small.test.labels, b.test.labels[:200])
    assert b.test.take(100).num_samples == 100 and len(b.test.take(100)) == 2


# ------------------------------------------------------------------------------------------ CIFAR-10
def test_cifar_zip_counts_and_classes(cifar_bundle):
    b = cifar_bundle
    print(f"\ncifar10 zip first load (decode 60k JPEGs): {b.first_load_seconds:.1f} s")
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, 32)
    assert b.train.images.shape == (50000, 3, 32, 32) and b.test.images.shape == (10000, 3, 32, 32)
    assert b.train.labels.bincount().tolist() == [5000] * 10
    assert b.test.labels.bincount().tolist() == [1000] * 10
    assert b.classes == list(readers.CIFAR10_CLASSES)
    assert b.mean == (0.485, 0.456, 0.406) and b.std == (0.229, 0.224, 0.225)
    assert b.train.pad == 4 and b.train.flip is True
    # round-robin order: the calibration tail holds 100 images of every class
    assert b.calib.labels.bincount().tolist() == [100] * 10


@pytest.mark.parametrize("member,split,index,label", [("train/cat/0000.jpg", "train", 3, 3),
                                                      ("test/ship/0007.jpg", "test", 78, 8)])
def test_cifar_known_image(cifar_bundle, cifar_zip, member, split, index, label):
    with zipfile.ZipFile(cifar_zip) as z, Image.open(io.BytesIO(z.read(member))) as im:
        ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    loader = getattr(cifar_bundle, split)
    assert torch.equal(loader.images[index], ref)
    assert loader.labels[index].item() == label


def _no_decode(*a, **k):
    raise AssertionError("decoded again despite a cache entry")


def test_cifar_cache_hit_identical(cifar_bundle, cifar_zip, monkeypatch):
    datasets.clear_memory_cache()
    monkeypatch.setattr(readers, "decode_images", _no_decode)
    t0 = time.perf_counter()
    again = get_data("cifar10", data_dir=cifar_zip)
    print(f"\ncifar10 zip second load (cache): {time.perf_counter() - t0:.2f} s")
    assert "; cache " in again.source
    assert torch.equal(again.train.images, cifar_bundle.train.images)
    assert torch.equal(again.test.images, cifar_bundle.test.images)
    assert torch.equal(again.test.labels, cifar_bundle.test.labels)


def _jpeg(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_decode_then_cache_hit_identical(isolated, monkeypatch):
    rng = np.random.default_rng(0)
    path = isolated / "tiny.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for split, n in (("train", 5), ("test", 2)):
            for cls in readers.CIFAR10_CLASSES:
                for k in range(n):
                    z.writestr(f"{split}/{cls}/{k:04d}.jpg", _jpeg(rng.integers(0, 256, (32, 32, 3))))
    cache = isolated / "cache"
    cold = get_data("cifar10", data_dir=path, cache_dir=cache, calib_size=10)
    assert "decoded, cached in" in cold.source
    entries = list(cache.glob("cifar10-tiny-*.pt"))
    assert len(entries) == 1
    with zipfile.ZipFile(path) as z, Image.open(io.BytesIO(z.read("train/bird/0004.jpg"))) as im:
        ref = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(cold.train.images[4 * 10 + 2], ref)  # round robin: image 4 of class 2
    monkeypatch.setattr(readers, "decode_images", _no_decode)
    datasets.clear_memory_cache()
    hot = get_data("cifar10", data_dir=path, cache_dir=cache, calib_size=10)
    assert f"cache {entries[0]}" in hot.source
    for a, b in ((cold.train, hot.train), (cold.test, hot.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert cold.calib.labels.bincount().tolist() == [1] * 10


def test_cifar_train_batches(cifar_bundle):
    tr = cifar_bundle.train
    x, y = next(iter(tr))
    assert x.shape == (256, 3, 32, 32) and y.shape == (256,)
    assert len(tr) == 196
    # a crop shift and a flip only move pixels: each augmented image agrees with its source where in view
    order, shifts, flips = tr.plan()
    src = cifar_bundle.normalize(tr.images[order[:256]])
    got = torch.where(flips[:256, None, None, None], x.flip(3), x)
    for k in range(0, 256, 37):
        dy, dx = shifts[k].tolist()
        h0, h1, w0, w1 = max(0, -dy), min(32, 32 - dy), max(0, -dx), min(32, 32 - dx)
        assert torch.allclose(got[k, :, h0:h1, w0:w1], src[k, :, h0 + dy:h1 + dy, w0 + dx:w1 + dx], atol=1e-6)


def test_cifar_binary_via_get_data(isolated):
    root = isolated / "data" / "cifar10" / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for f, n in [(f"data_batch_{i}.bin", 4) for i in range(1, 6)] + [("test_batch.bin", 3)]:
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        img = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        (root / f).write_bytes(np.concatenate([labels[:, None], img], 1).tobytes())
    b = get_data("cifar10", data_dir=isolated / "data", calib_size=2, batch_size=8)
    assert "cifar-bin" in b.source
    assert b.train.images.shape == (20, 3, 32, 32) and b.test.images.shape == (3, 3, 32, 32)
    assert len(b.train) == 3 and b.calib.num_samples == 2


# ------------------------------------------------------------------------------- lookup and errors
def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*mnist, fashion-mnist, cifar10, imagenet"):
        get_data("cifar11")


def test_offline_error_says_where_and_how(isolated):
    with pytest.raises(FileNotFoundError) as e:
        get_data("fashion-mnist", cache_dir=isolated / "cache")
    msg = str(e.value)
    for part in ("dataset 'fashion-mnist' not found", "$QCNN_DATA: not set", str(isolated / "system" / "fashion-mnist"),
                 "download into", "network unreachable", "apt-get install dataset-fashion-mnist", "--data-dir",
                 "QCNN_DATA=ROOT"):
        assert part in msg, part


def test_explicit_data_dir_does_not_fall_back(isolated):
    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere: does not exist"):
        get_data("mnist", data_dir=isolated / "nowhere")


def test_lookup_order_env_then_system(isolated, monkeypatch, fashion_dir):
    (isolated / "system" / "fashion-mnist").mkdir(parents=True)
    assert locate("fashion-mnist", download=False).source is None
    monkeypatch.setattr(datasets, "SYSTEM_ROOTS", [fashion_dir.parent])
    assert locate("fashion-mnist", download=False).source.origin == "system"
    env = isolated / "env"
    env.mkdir()
    (env / "fashion-mnist").symlink_to(fashion_dir)
    monkeypatch.setenv("QCNN_DATA", str(env))
    hit = locate("fmnist", download=False).source
    assert hit.origin == "$QCNN_DATA" and hit.path == env / "fashion-mnist"


def test_empty_split_is_an_error(isolated):
    root = isolated / "imgs"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no ImageFolder layout"):
        get_data("imagefolder", data_dir=root)


# ---------------------------------------------------------------------------------- streamed folders
def _folder(root, n_per_class=6, classes=("cat", "dog", "emu")):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("val", 2)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(n):
                arr = rng.integers(0, 256, (20 + k, 30, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{k}.png")


def test_streamed_imagefolder(isolated):
    _folder(isolated / "imgs")
    b = get_data("imagefolder", data_dir=isolated / "imgs", batch_size=4, image_size=16, calib_size=3,
                 num_workers=0)
    assert b.classes == ["cat", "dog", "emu"] and b.num_classes == 3 and b.image_size == 16
    x, y = next(iter(b.test))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 1, 2, 0]
    assert len(b.train) == 5 and b.test.num_samples == 6
    assert [y.tolist() for _, y in b.calib] == [[0, 1, 2]]
    shards = [sorted(get_data("imagefolder", data_dir=isolated / "imgs", batch_size=4, image_size=16, calib_size=0,
                              rank=r, world_size=2, num_workers=0).train.plan().tolist()) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 9 and not set(shards[0]) & set(shards[1])


def test_train_and_test_limits(fashion_dir):
    b = get_data("fashion-mnist", train_limit=1000, test_limit=300, calib_size=100, exclude_calib=True)
    assert b.train.num_samples == 1000 and b.test.num_samples == 300 and b.calib.num_samples == 100
    full = get_data("fashion-mnist", calib_size=100)
    assert torch.equal(b.calib.images, full.calib.images) and torch.equal(b.train.images, full.train.images[:1000])


def test_download_lands_in_cache_and_is_reused(isolated, monkeypatch):
    calls = []

    def fake_download(root):  # writes what torchvision's CIFAR10(download=True) leaves: cifar-10-batches-py
        calls.append(root)
        import pickle

        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for i, f in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
            with open(d / f, "wb") as fh:
                pickle.dump({b"data": np.full((2, 3072), i, np.uint8), b"labels": [i % 10, 1]}, fh)

    monkeypatch.setattr(DATASETS["cifar10"], "download", fake_download)
    cache = isolated / "cache"
    b = get_data("cifar10", cache_dir=cache, calib_size=1)
    assert calls == [cache / "cifar10"] and "cifar-py, downloaded" in b.source
    b.train.images.zero_()  # in-place edits of one bundle do not leak into the next
    assert b.train.num_samples == 10 and b.test.images.unique().tolist() == [5]
    assert b.train.labels[::2].tolist() == [0, 1, 2, 3, 4]
    again = get_data("cifar10", cache_dir=cache, calib_size=1)
    assert len(calls) == 1  # found in the cache the second time
    assert again.train.images[::2, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] and "reused" in again.source


def test_streamed_epochs_reproducible_with_workers(isolated):
    _folder(isolated / "imgs", n_per_class=2)
    make = lambda: get_data("imagefolder", data_dir=isolated / "imgs", batch_size=6, image_size=8, calib_size=0,
                            num_workers=1, seed=4).train
    a, b = make(), make()
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(1)
    assert not torch.equal(next(iter(b))[0], xa)


def test_qcnn_data_root_finds_the_jpeg_zip(isolated, monkeypatch, cifar_zip):
    monkeypatch.setenv("QCNN_DATA", str(cifar_zip.parent))
    src = locate("cifar10", download=False).source
    assert (src.kind, src.path, src.origin) == ("zip", cifar_zip, "$QCNN_DATA")
    # --data-dir may also be a root holding <name>-jpeg.zip
    assert locate("cifar-10", data_dir=cifar_zip.parent).source.path == cifar_zip


def test_empty_idx_split_names_the_dataset(isolated):
    import struct

    d = isolated / "fm"
    d.mkdir()
    for stem, shape in (("train-images-idx3-ubyte", (0, 28, 28)), ("train-labels-idx1-ubyte", (0,)),
                        ("t10k-images-idx3-ubyte", (1, 28, 28)), ("t10k-labels-idx1-ubyte", (1,))):
        n = int(np.prod(shape))
        head = struct.pack(">BBBB", 0, 0, 8, len(shape)) + struct.pack(f">{len(shape)}i", *shape)
        (d / stem).write_bytes(head + bytes(n))
    with pytest.raises(ValueError, match="dataset fashion-mnist: the training split at .*fm is empty"):
        get_data("fashion-mnist", data_dir=d)

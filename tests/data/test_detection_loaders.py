"""Detection loaders: flips of images and boxes, seeded epochs, take / len, normalisation, the bundle's splits."""

from __future__ import annotations

import math

import pytest
import torch

from qcnn.data.augment import Normalize
from qcnn.data.detection import composited_detection
from qcnn.data.detection_loaders import (
    DETECTION_MEAN,
    DETECTION_STD,
    DetectionLoader,
    detection_bundle,
    is_detection_set,
    pixel_statistics,
)

N, H, W = 12, 8, 16
IDENTITY = Normalize((0.0,), (1.0,))


def _data(n: int = N):
    """``n`` distinct, left-right asymmetric uint8 images and 1-2 distinct boxes per image (int64 on purpose)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, H, W), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # a unique mark, top-left only
    images[:, 0, 0, -1] = 255
    boxes, labels = [], []
    for i in range(n):
        b = [[i % 5, 1, i % 5 + 3 + i % 2, 5]] + ([[7, 0, 15, 8]] if i % 3 == 0 else [])
        boxes.append(torch.tensor(b, dtype=torch.int64))
        labels.append(torch.tensor([i % 10] + ([9] if i % 3 == 0 else []), dtype=torch.int32))
    return images, boxes, labels


def _loader(n: int = N, **kw) -> DetectionLoader:
    kw.setdefault("batch_size", 5)
    kw.setdefault("normalize", IDENTITY)
    return DetectionLoader(*_data(n), **kw)


def _flipped(b: torch.Tensor) -> torch.Tensor:
    b = b.float()
    return torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)


def _epoch(loader: DetectionLoader):
    xs, ts = [], []
    for x, t in loader:
        xs.append(x)
        ts.extend(t)
    return torch.cat(xs), ts


# ------------------------------------------------------------------------------------------- loader
def test_flip_mirrors_images_and_boxes_exactly():
    images, boxes, labels = _data()
    loader = _loader(shuffle=True, flip=True, seed=3)
    loader.set_epoch(1)
    x, targets = _epoch(loader)
    ref = IDENTITY(images)  # the same normalisation op, so the comparison is exact
    seen, n_flipped = [], 0
    for k in range(N):
        # identify the source image independently of the loader's plan
        plain = [i for i in range(N) if torch.equal(x[k], ref[i])]
        mirrored = [i for i in range(N) if torch.equal(x[k], ref[i].flip(-1))]
        assert len(plain) + len(mirrored) == 1
        if plain:
            i = plain[0]
            assert torch.equal(targets[k]["boxes"], boxes[i].float())
        else:
            i = mirrored[0]
            n_flipped += 1
            assert torch.equal(targets[k]["boxes"], _flipped(boxes[i]))
        assert targets[k]["boxes"].dtype == torch.float32 and targets[k]["labels"].dtype == torch.int64
        assert torch.equal(targets[k]["labels"], labels[i].long())
        seen.append(i)
    assert sorted(seen) == list(range(N)) and seen != list(range(N))  # a permutation, not the stored order
    assert 0 < n_flipped < N
    # the loader's plan says the same, and the stored boxes were not changed by the flips
    order, flips = loader.plan()
    assert order.tolist() == seen and int(flips.sum()) == n_flipped
    assert all(torch.equal(loader.boxes[i], boxes[i].float()) for i in range(N))
    # one hand check of the box formula: [x0, y0, x1, y1] = [0, 1, 3, 5] -> [13, 1, 16, 5]
    assert _flipped(torch.tensor([[0, 1, 3, 5]])).tolist() == [[13.0, 1.0, 16.0, 5.0]]


def test_epochs_are_a_function_of_seed_and_epoch():
    a, b = _loader(shuffle=True, flip=True, seed=7), _loader(shuffle=True, flip=True, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    xa, ta = _epoch(a)
    xb, tb = _epoch(b)
    assert torch.equal(xa, xb)
    assert all(torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["labels"], q["labels"]) for p, q in zip(ta, tb))
    b.set_epoch(3)
    xc, _ = _epoch(b)
    assert not torch.equal(xa, xc)
    assert a.plan()[0].tolist() != b.plan()[0].tolist()
    b.set_epoch(2)  # going back gives epoch 2 again
    assert torch.equal(_epoch(b)[0], xa)
    c = _loader(shuffle=True, flip=True, seed=8)
    c.set_epoch(2)
    assert c.plan()[0].tolist() != a.plan()[0].tolist()


def test_unshuffled_order_no_flip_and_normalisation():
    images, boxes, _ = _data()
    norm = Normalize(DETECTION_MEAN, DETECTION_STD)
    loader = _loader(normalize=norm, flip=True)  # flip without shuffle: no augmentation (evaluation order)
    x, targets = _epoch(loader)
    expected = (images.float() / 255 - DETECTION_MEAN[0]) / DETECTION_STD[0]
    assert x.dtype == torch.float32 and x.shape == (N, 1, H, W)
    torch.testing.assert_close(x, expected, rtol=0, atol=2e-6)
    assert [t["boxes"].tolist() for t in targets] == [b.float().tolist() for b in boxes]
    # normalised pixel 0 and 255 hit the formula's end points
    assert float(x.min()) == pytest.approx(-DETECTION_MEAN[0] / DETECTION_STD[0], abs=1e-6)
    assert float(x.max()) == pytest.approx((1 - DETECTION_MEAN[0]) / DETECTION_STD[0], abs=1e-5)


def test_len_take_and_drop_last():
    loader = _loader(batch_size=5)
    assert len(loader) == math.ceil(N / 5) == 3
    assert [len(t) for _, t in loader] == [5, 5, 2]
    dropped = _loader(batch_size=5, drop_last=True)
    assert len(dropped) == 2 and [len(t) for _, t in dropped] == [5, 5]
    images, boxes, _ = _data()
    small = loader.take(7)
    assert len(small) == 2 and len(small.images) == 7
    x, targets = _epoch(small)
    assert torch.equal(x, IDENTITY(images[:7]))
    assert [t["boxes"].tolist() for t in targets] == [b.float().tolist() for b in boxes[:7]]
    assert len(loader.take(100).images) == N
    assert len(loader.images) == N  # take returns a copy
    shuffled = _loader(shuffle=True, seed=1).take(4)
    assert sorted(shuffled.plan()[0].tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="n must be >= 1"):
        loader.take(0)


@pytest.mark.parametrize("change, match", [
    (lambda im, bx, lb: (im.float(), bx, lb), "must be uint8"),
    (lambda im, bx, lb: (im[:, 0], bx, lb), "must be uint8"),
    (lambda im, bx, lb: (im, bx[:-1], lb), f"{N} images but {N - 1} box lists and {N} label lists"),
    (lambda im, bx, lb: (im, bx, lb[:2]), f"{N} images but {N} box lists and 2 label lists"),
    (lambda im, bx, lb: (im[:0], [], []), "is empty"),
])
def test_bad_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        DetectionLoader(*change(*_data()), batch_size=4, normalize=IDENTITY, name="mine")
    with pytest.raises(ValueError, match="batch_size=0"):
        DetectionLoader(*_data(), batch_size=0, normalize=IDENTITY)


# ------------------------------------------------------------------------------------------- bundle
@pytest.fixture(scope="module")
def bundle_cache(fashion_dir, tmp_path_factory):
    return tmp_path_factory.mktemp("detection-cache")


def _bundle(fashion_dir, cache, **kw):
    kw = {"n_train": 24, "n_test": 10, "calib_size": 6, "batch_size": 8, **kw}
    return detection_bundle(data_dir=fashion_dir, cache_dir=cache, download=False, **kw)


def test_bundle_splits_and_calibration(fashion_dir, bundle_cache):
    train = composited_detection("train", 24, data_dir=fashion_dir, cache_dir=bundle_cache, download=False)
    test = composited_detection("test", 10, data_dir=fashion_dir, cache_dir=bundle_cache, download=False)
    b = _bundle(fashion_dir, bundle_cache, seed=4)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 1, 96)
    assert tuple(b.mean) == DETECTION_MEAN and tuple(b.std) == DETECTION_STD and b.classes[0] == "T-shirt/top"
    assert torch.equal(b.train.images, train.images) and len(b.train) == 3
    assert b.train.shuffle and b.train.flip and b.train.seed == 4
    assert torch.equal(b.test.images, test.images) and not b.test.shuffle
    # calibration: the last calib_size training canvases, fixed order, no flips
    assert torch.equal(b.calib.images, train.images[-6:])
    assert not b.calib.shuffle and not b.calib.flip and len(b.calib) == 1
    x, targets = next(iter(b.calib))
    assert torch.equal(x, Normalize(DETECTION_MEAN, DETECTION_STD)(train.images[-6:]))
    assert all(torch.equal(t["boxes"], bx) for t, bx in zip(targets, train.boxes[-6:]))
    assert all(torch.equal(t["labels"], lb) for t, lb in zip(targets, train.labels[-6:]))
    # exclude_calib removes them from training; limits take prefixes; calib_size 0 gives no calibration set
    ex = _bundle(fashion_dir, bundle_cache, exclude_calib=True)
    assert torch.equal(ex.train.images, train.images[:18]) and torch.equal(ex.calib.images, train.images[18:])
    lim = _bundle(fashion_dir, bundle_cache, calib_size=0, train_limit=5, test_limit=3, eval_batch_size=2,
                  augment=False)
    assert lim.calib is None and torch.equal(lim.train.images, train.images[:5]) and not lim.train.flip
    assert torch.equal(lim.test.images, test.images[:3]) and len(lim.test) == 2
    assert is_detection_set("Fashion-Detection") and not is_detection_set("fashion-mnist")


def test_bundle_calib_size_limits(fashion_dir, bundle_cache):
    train = composited_detection("train", 24, data_dir=fashion_dir, cache_dir=bundle_cache, download=False)
    # a calibration set larger than the training set is all of it (without exclude_calib)
    big = _bundle(fashion_dir, bundle_cache, calib_size=25)
    assert torch.equal(big.calib.images, train.images) and torch.equal(big.train.images, train.images)
    with pytest.raises(ValueError, match="calib_size=24 must be between 0 and the 24 training images .fewer"):
        _bundle(fashion_dir, bundle_cache, calib_size=24, exclude_calib=True)
    with pytest.raises(ValueError, match="calib_size=-1 must be between 0"):
        _bundle(fashion_dir, bundle_cache, calib_size=-1)
    with pytest.raises(ValueError, match="unknown detection data set 'voc'"):
        _bundle(fashion_dir, bundle_cache, name="VOC")
    with pytest.raises(ValueError, match="no distributed"):
        _bundle(fashion_dir, bundle_cache, world_size=2)


def test_pixel_statistics():
    # two images of 1 x 2 pixels; channel 0 holds 0, 255, 0, 255 and channel 1 holds 51 everywhere but one 255:
    # mean 0.5 and sample std 0.57735; mean (3 * 0.2 + 1) / 4 = 0.4 and sample std 0.4
    images = torch.tensor([[[[0, 255]], [[51, 51]]], [[[0, 255]], [[51, 255]]]], dtype=torch.uint8)
    mean, std = pixel_statistics(images)
    assert mean == (0.5, 0.4) and std == (0.5774, 0.4)
    mean, std = pixel_statistics(torch.full((3, 1, 2, 2), 51, dtype=torch.uint8))
    assert mean == (0.2,) and std == (0.001,)  # a constant channel: the deviation floor

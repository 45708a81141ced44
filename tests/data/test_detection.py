"""Detection data: the composited Fashion-MNIST set (determinism, exact boxes, labels, cache) and the COCO loader."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qcnn.data import readers
from qcnn.data.detection import (
    CocoDetection,
    DetectionSet,
    composited_detection,
    content_hash,
    detection_collate,
    detection_loader,
    scale_object,
)


@pytest.fixture(scope="module")
def fashion_test(fashion_dir):
    return readers.read_idx_split(fashion_dir, "test")


def _gen(**kw) -> DetectionSet:
    kw.setdefault("n_images", 32)
    return composited_detection(cache=False, **kw)


def _disjoint(boxes: torch.Tensor) -> bool:
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a].tolist(), boxes[b].tolist()
            if min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0):
                return False
    return True


# ---------------------------------------------------------------------------------- composited set
def test_shapes_types_and_item(fashion_dir):
    ds = _gen(split="test", seed=1)
    assert len(ds) == 32 and ds.images.shape == (32, 1, 96, 96) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    for b, lab, s in zip(ds.boxes, ds.labels, ds.sources):
        assert b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == 4
        assert lab.dtype == torch.int64 and s.dtype == torch.int64 and 1 <= len(b) == len(lab) == len(s) <= 4
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        assert (b[:, :2] >= 0).all() and (b[:, 2:] <= 96).all()
        assert (torch.maximum(w, h) >= 14).all() and (torch.maximum(w, h) <= 40).all()
        assert ((lab >= 0) & (lab < 10)).all()
    x, t = ds[3]
    assert x.shape == (1, 96, 96) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, ds.images[3].float() / 255)
    assert torch.equal(t["boxes"], ds.boxes[3]) and torch.equal(t["labels"], ds.labels[3])
    t["boxes"] += 1  # the item is a copy
    assert not torch.equal(t["boxes"], ds.boxes[3])
    assert any(not _disjoint(b) for b in ds.boxes) or len(ds) < 8  # occlusion happens with the defaults


def test_deterministic_by_seed(fashion_dir):
    a, b, c = _gen(split="test", seed=5), _gen(split="test", seed=5), _gen(split="test", seed=6)
    assert torch.equal(a.images, b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
    assert all(torch.equal(x, y) for x, y in zip(a.labels, b.labels))
    assert not torch.equal(a.images, c.images)
    assert [x.tolist() for x in a.boxes] != [x.tolist() for x in c.boxes]
    # canvas i has its own random stream: a smaller set is a prefix of a larger one
    small = _gen(split="test", seed=5, n_images=8)
    assert torch.equal(small.images, a.images[:8])
    # the train split draws from the Fashion-MNIST training images
    tr = _gen(split="train", seed=5)
    assert not torch.equal(tr.images, a.images)


def test_boxes_tight_around_pasted_objects(fashion_dir):
    ds = _gen(split="test", seed=2, n_images=48, objects=(1, 3), scale=(14, 24))
    checked = 0
    for i in range(len(ds)):
        boxes = ds.boxes[i].long()
        if not _disjoint(boxes):
            continue
        img = ds.images[i, 0]
        inside = torch.zeros_like(img, dtype=torch.bool)
        for x0, y0, x1, y1 in boxes.tolist():
            crop = img[y0:y1, x0:x1]
            # each border row and column of the box holds a nonzero pixel of the object
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
            inside[y0:y1, x0:x1] = True
        assert (img[~inside] == 0).all()  # outside the boxes: the (black) background
        checked += 1
    assert checked >= 24


def test_labels_and_pixels_are_the_source_objects(fashion_test):
    images, labels = fashion_test
    ds = _gen(split="test", seed=3, objects=1, scale=(14, 40))
    for i in range(len(ds)):
        (x0, y0, x1, y1), = ds.boxes[i].long().tolist()
        src = int(ds.sources[i][0])
        assert int(ds.labels[i][0]) == int(labels[src])
        expected = scale_object(images[src, 0].numpy(), max(x1 - x0, y1 - y0))
        assert np.array_equal(ds.images[i, 0, y0:y1, x0:x1].numpy(), expected)
    # an independent check that the object is the source: shrunk back, it correlates with the source crop
    (x0, y0, x1, y1), = ds.boxes[0].long().tolist()
    src = images[int(ds.sources[0][0]), 0].numpy()
    rows, cols = np.flatnonzero(src.any(1)), np.flatnonzero(src.any(0))
    ref = src[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(float)
    back = np.asarray(Image.fromarray(ds.images[0, 0, y0:y1, x0:x1].numpy()).resize(ref.shape[::-1]), float)
    assert np.corrcoef(back.ravel(), ref.ravel())[0, 1] > 0.9


@pytest.mark.parametrize("min_visible", [0.5, 0.9])
def test_min_visible_bounds_occlusion(fashion_test, min_visible):
    images, _ = fashion_test
    ds = _gen(split="test", seed=9, objects=(3, 4), scale=(30, 40), min_visible=min_visible)
    occluded = 0
    for i in range(len(ds)):
        masks = []
        for (x0, y0, x1, y1), src in zip(ds.boxes[i].long().tolist(), ds.sources[i].tolist()):
            m = torch.zeros(96, 96, dtype=torch.bool)
            m[y0:y1, x0:x1] = torch.from_numpy(scale_object(images[src, 0].numpy(), max(x1 - x0, y1 - y0)) > 0)
            masks.append(m)
        for j, m in enumerate(masks):
            later = torch.stack(masks[j + 1:]).any(0) if j + 1 < len(masks) else torch.zeros_like(m)
            visible = (m & ~later).sum() / m.sum()
            assert visible >= min_visible
            occluded += bool(visible < 1)
    assert occluded > 0


def test_noise_background_and_blend(fashion_dir):
    ds = _gen(split="test", seed=4, noise=30, objects=1)
    img, (x0, y0, x1, y1) = ds.images[0, 0], ds.boxes[0][0].long().tolist()
    outside = torch.ones_like(img, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert img[outside].max() <= 30 and img[outside].float().mean() > 5
    assert torch.equal(ds.images, _gen(split="test", seed=4, noise=30, objects=1).images)
    a = _gen(split="test", seed=4, objects=(3, 4), min_visible=0.0)
    m = _gen(split="test", seed=4, objects=(3, 4), min_visible=0.0, blend="max")
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, m.boxes))  # same layout, other composite
    assert not torch.equal(a.images, m.images) and (m.images >= a.images).all()


def test_bad_parameters(fashion_dir):
    with pytest.raises(ValueError, match="split"):
        composited_detection("val", 4, cache=False)
    with pytest.raises(ValueError, match="scale"):
        composited_detection("test", 4, canvas=32, scale=(14, 40), cache=False)
    with pytest.raises(ValueError, match="objects"):
        composited_detection("test", 4, objects=(3, 2), cache=False)
    with pytest.raises(ValueError, match="blend"):
        composited_detection("test", 4, blend="add", cache=False)
    with pytest.raises(ValueError, match="n_images"):
        composited_detection("test", 0, cache=False)


def test_cache_round_trip_and_corruption(fashion_dir, tmp_path):
    ds = composited_detection("test", 16, seed=7, cache_dir=tmp_path)
    files = list(tmp_path.glob("detection-fashion-test-*.pt"))
    assert len(files) == 1 and "cached in" in ds.origin
    again = composited_detection("test", 16, seed=7, cache_dir=tmp_path)
    assert again.origin.startswith("cache ") and torch.equal(again.images, ds.images)
    assert all(torch.equal(x, y) for x, y in zip(again.boxes, ds.boxes))
    assert all(torch.equal(x, y) for x, y in zip(again.sources, ds.sources))
    # other parameters: another file
    composited_detection("test", 16, seed=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("detection-fashion-test-*.pt"))) == 2

    # damaged bytes: the zip CRC check fails; the file is named, the set generated again
    path = files[0]
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=path.name):
        rebuilt = composited_detection("test", 16, seed=7, cache_dir=tmp_path)
    assert torch.equal(rebuilt.images, ds.images) and "cached in" in rebuilt.origin

    # a readable file whose tensors were edited: the stored SHA-256 no longer matches
    entry = torch.load(path, weights_only=True)
    assert entry["sha256"] == content_hash(entry)
    entry["images"][0, 0, 0, 0] += 1
    torch.save(entry, path)
    with pytest.warns(UserWarning, match="SHA-256"):
        rebuilt = composited_detection("test", 16, seed=7, cache_dir=tmp_path)
    assert torch.equal(rebuilt.images, ds.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sound again
        assert composited_detection("test", 16, seed=7, cache_dir=tmp_path).origin.startswith("cache ")


def test_collate_and_loader(fashion_dir):
    ds = _gen(split="test", seed=0, n_images=10)
    x, targets = next(iter(detection_loader(ds, batch_size=4)))
    assert x.shape == (4, 1, 96, 96) and len(targets) == 4
    assert torch.equal(targets[1]["boxes"], ds.boxes[1])
    order = lambda seed: [t["boxes"].tolist() for _, ts in detection_loader(ds, 3, shuffle=True, seed=seed)
                          for t in ts]
    assert order(1) == order(1) and order(1) != order(2)
    assert sorted(map(str, order(1))) == sorted(str(b.tolist()) for b in ds.boxes)


# ---------------------------------------------------------------------------------------------- COCO
def _coco_folder(tmp_path, annotations=None, images=None):
    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {"a.png": (40, 60), "b.png": (30, 30), "c.png": (50, 20)}  # (H, W)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    if images is None:
        images = [{"id": 10, "file_name": "a.png", "width": 60, "height": 40},
                  {"id": 11, "file_name": "b.png", "width": 30, "height": 30},
                  {"id": 12, "file_name": "c.png"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "bbox": [5, 6, 10, 20], "category_id": 7},
            {"id": 2, "image_id": 10, "bbox": [50, 30, 20, 20], "category_id": 3},   # clipped at 60 x 40
            {"id": 3, "image_id": 10, "bbox": [1, 1, 0, 5], "category_id": 3},       # no area: dropped
            {"id": 4, "image_id": 11, "bbox": [0, 0, 30, 30], "category_id": 12, "iscrowd": 1},
            {"id": 5, "image_id": 11, "bbox": [2.5, 3.5, 4, 5], "category_id": 12, "iscrowd": 0},
        ]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}]}
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return root, ann


def test_coco_boxes_and_labels(tmp_path):
    root, ann = _coco_folder(tmp_path)
    ds = CocoDetection(root, ann)
    assert len(ds) == 3 and ds.classes == ["dog", "cat", "bird"] and ds.cat_ids == [3, 7, 12]
    assert ds.label_of == {3: 0, 7: 1, 12: 2} and ds.num_classes == 3
    x, t = ds[0]
    assert x.shape == (3, 40, 60) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    png = np.array(Image.open(root / "a.png"))
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(png).permute(2, 0, 1))
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    assert t["boxes"].tolist() == [[5, 6, 15, 26], [50, 30, 60, 40]] and t["labels"].tolist() == [1, 0]
    _, t = ds[1]
    assert t["boxes"].tolist() == [[2.5, 3.5, 6.5, 8.5]] and t["labels"].tolist() == [2]  # crowd left out
    x, t = ds[2]
    assert x.shape == (3, 50, 20) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)

    crowd = CocoDetection(root, ann, include_crowd=True)
    _, t = crowd[1]
    assert t["boxes"].tolist() == [[0, 0, 30, 30], [2.5, 3.5, 6.5, 8.5]] and t["iscrowd"].tolist() == [1, 0]

    gray = CocoDetection(root, ann, image_size=(20, 120), channels=1)
    x, t = gray[0]
    assert x.shape == (1, 20, 120)
    assert torch.allclose(t["boxes"], torch.tensor([[10.0, 3, 30, 13], [100, 15, 120, 20]]))
    images, targets = detection_collate([gray[i] for i in range(3)])
    assert images.shape == (3, 1, 20, 120) and len(targets) == 3
    with pytest.raises(ValueError, match="different sizes"):
        detection_collate([ds[0], ds[1]])


@pytest.mark.parametrize("bad, match", [
    ({"image_id": 99, "bbox": [0, 0, 1, 1], "category_id": 7}, "unknown image_id 99"),
    ({"image_id": 10, "bbox": [0, 0, 1, 1], "category_id": 5}, "unknown category_id 5"),
    ({"image_id": 10, "bbox": [0, 0, 1], "category_id": 7}, "bad bbox"),
    ({"image_id": 10, "bbox": [0, 0, -1, 4], "category_id": 7}, "bad bbox"),
    ({"image_id": 10, "bbox": [0, "0", 1, 4], "category_id": 7}, "bad bbox"),
    ({"image_id": 10, "bbox": [0, float("nan"), 1, 4], "category_id": 7}, "bad bbox"),
    ({"image_id": 10, "category_id": 7}, "bad bbox"),
])
def test_coco_bad_annotation(tmp_path, bad, match):
    root, ann = _coco_folder(tmp_path, annotations=[{"id": 42, **bad}])
    with pytest.raises(ValueError, match=match) as e:
        CocoDetection(root, ann)
    assert "instances.json" in str(e.value) and "42" in str(e.value)


def test_coco_bad_files(tmp_path):
    root, ann = _coco_folder(tmp_path, images=[{"id": 1, "file_name": "missing.png"}], annotations=[])
    with pytest.raises(ValueError, match="missing.png"):
        CocoDetection(root, ann)
    ann.write_text('{"images": [}')
    with pytest.raises(ValueError, match="instances.json.*not valid JSON"):
        CocoDetection(root, ann)
    ann.write_text('{"images": []}')
    with pytest.raises(ValueError, match="instances.json.*'categories'"):
        CocoDetection(root, ann)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDetection(root, tmp_path / "nothere.json")
    # an image that is not an image, and one whose size disagrees with the JSON: named when loaded
    (root / "junk.png").write_bytes(b"not a png")
    root, ann = _coco_folder(tmp_path, images=[{"id": 1, "file_name": "junk.png"},
                                               {"id": 2, "file_name": "b.png", "width": 31, "height": 30}],
                             annotations=[])
    ds = CocoDetection(root, ann)
    with pytest.raises(ValueError, match="junk.png.*cannot be decoded"):
        ds[0]
    with pytest.raises(ValueError, match="b.png.*30x30.*31x30"):
        ds[1]

"""Detection data: a composited Fashion-MNIST detection set and a COCO-format loader.

Both give ``(image, target)`` pairs: ``image`` float32 ``[C, H, W]`` in ``[0, 1]``, ``target`` a dict with
``boxes`` float32 ``[k, 4]`` in ``xyxy`` pixel coordinates (pixel ``(row r, col c)`` covers
``[c, c + 1) x [r, r + 1)``, so a box ``(x0, y0, x1, y1)`` spans ``x1 - x0`` columns) and ``labels`` int64
``[k]`` in ``0..C-1``. :func:`detection_collate` stacks the images of a batch and keeps the targets as a list.

Composited set (:func:`composited_detection`): real Fashion-MNIST objects pasted onto larger grayscale
canvases. For every object, a source image of the split is drawn, cropped to its nonzero pixels, resized
(PIL bilinear, integer arithmetic) so that its longer side is ``s`` pixels (``s`` uniform in ``scale``),
cropped to its nonzero pixels again and placed uniformly at random fully inside the canvas. Its box is that
tight crop's position and size, exactly; its label is the source's Fashion-MNIST label, and the source's
index in the split is recorded (``sources``). Later objects are drawn over earlier ones: ``blend="alpha"``
replaces the canvas wherever the new object's pixels are nonzero, ``blend="max"`` keeps the pixelwise
maximum. Occlusion is allowed but bounded: a placement is re-drawn (up to 50 tries, then the object is left
out) if it would leave an earlier object with less than ``min_visible`` of its nonzero pixels uncovered by
the nonzero pixels of later objects; boxes are the full (amodal) extent of each object. Canvas ``i`` is
drawn from its own random stream, seeded by ``(seed, split, i)`` with numpy's PCG64, so the same
parameters give byte-identical images and boxes on every run, and a smaller ``n_images`` is a prefix of a
larger one. ``train`` canvases take their objects from the Fashion-MNIST training split, ``test`` canvases
from its test split.

Generated sets are cached in the cache directory (``$QCNN_CACHE``, else ``~/.cache/qcnn``) as a ``.pt``
file whose name carries a key of the generator's parameters, seed, version and the source files' identity.
The file stores a SHA-256 of its tensors; on load the zip CRC-32s and this hash are checked, and a file that
fails either (or holds other parameters) is reported with a warning naming it and generated again.

COCO format (:class:`CocoDetection`): an images folder plus an instances JSON with
``images[{id, file_name, width?, height?}]``, ``annotations[{image_id, bbox: [x, y, w, h], category_id,
iscrowd?}]`` and ``categories[{id, name}]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qcnn.data import datasets
from qcnn.data.cache import cache_dir as _cache_dir
from qcnn.data.cache import save_atomic, source_fingerprint
from qcnn.io import check_zip_integrity

#: bump when the generator's output for given parameters changes (old cache entries are then ignored)
GENERATOR_VERSION = 1
SPLITS = {"train": 0, "test": 1}
BLENDS = ("alpha", "max")
#: placement tries per object before it is left out (see ``min_visible``)
PLACEMENT_TRIES = 50


# --------------------------------------------------------------------------------------- the set
@dataclass(eq=False)
class DetectionSet(torch.utils.data.Dataset):
    """A detection set held in memory.

    ``images`` uint8 ``[N, C, H, W]``; per image ``boxes[i]`` float32 ``[k_i, 4]`` (xyxy pixels),
    ``labels[i]`` int64 ``[k_i]`` and, for the composited set, ``sources[i]`` int64 ``[k_i]`` (index of each
    object's source image in its Fashion-MNIST split). ``ds[i]`` is ``(image float32 [C, H, W] in [0, 1],
    {"boxes", "labels"})`` with copies of the stored tensors.
    """

    images: torch.Tensor
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    classes: list[str]
    sources: list[torch.Tensor] = field(default_factory=list)
    params: dict = field(default_factory=dict)  #: generator parameters (composited set)
    origin: str = ""  #: where the data came from (generated, cache file, ...)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = self.images[i].float().div_(255)
        return image, {"boxes": self.boxes[i].clone(), "labels": self.labels[i].clone()}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        n_obj = sum(len(b) for b in self.boxes)
        return (f"DetectionSet({len(self)} images {tuple(self.images.shape[1:])}, {n_obj} objects, "
                f"{self.num_classes} classes, {self.origin})")


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """``[(image, target), ...]`` -> ``(images [B, C, H, W], [target, ...])``; the images must share a size."""
    images = [b[0] for b in batch]
    shapes = {tuple(x.shape) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"detection_collate: images of different sizes in one batch ({sorted(shapes)}); give "
                         "the dataset an image_size so that every image has the same size")
    return torch.stack(images), [b[1] for b in batch]


def detection_loader(ds: torch.utils.data.Dataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                     num_workers: int = 0, drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of ``(images, targets)`` batches (:func:`detection_collate`); with ``shuffle`` the order is
    drawn from a generator seeded with ``seed`` (the same seed gives the same order)."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=num_workers, drop_last=drop_last, collate_fn=detection_collate)


# ------------------------------------------------------------------------------ the generator
def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in t):
        raise ValueError(f"{name}={v!r} must be an int or a pair of ints")
    return int(t[0]), int(t[1])


def tight_crop(img: np.ndarray) -> np.ndarray | None:
    """The smallest sub-array of the 2-D ``img`` holding all its nonzero pixels (None when all are zero)."""
    rows, cols = np.flatnonzero(img.any(axis=1)), np.flatnonzero(img.any(axis=0))
    if len(rows) == 0:
        return None
    return img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def scale_object(img: np.ndarray, size: int) -> np.ndarray | None:
    """A source image as pasted: cropped to its nonzero pixels, resized with PIL's bilinear filter so that its
    longer side is ``size`` (aspect ratio kept, the shorter side rounded, at least 1), cropped to its nonzero
    pixels again. None for a blank image."""
    from PIL import Image

    crop = tight_crop(img)
    if crop is None:
        return None
    h, w = crop.shape
    f = size / max(h, w)
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((nw, nh), Image.BILINEAR))
    return tight_crop(out)


def _compose(src: np.ndarray, src_labels: np.ndarray, rng: np.random.Generator, hw: tuple[int, int],
             objects: tuple[int, int], scale: tuple[int, int], noise: int, blend: str, min_visible: float):
    """One canvas: (uint8 [H, W], boxes [k, 4], labels [k], sources [k])."""
    H, W = hw
    canvas = (rng.integers(0, noise + 1, size=(H, W), dtype=np.uint8) if noise else np.zeros((H, W), np.uint8))
    owner = np.full((H, W), -1, np.int64)  # last object whose nonzero pixel covers each position
    total: list[int] = []  # nonzero pixel count of each placed object
    boxes, labels, sources = [], [], []
    k = int(rng.integers(objects[0], objects[1] + 1))
    for _ in range(k):
        obj = None
        while obj is None:  # a blank source (or one that vanishes when resized) is drawn again
            idx = int(rng.integers(0, len(src)))
            obj = scale_object(src[idx], int(rng.integers(scale[0], scale[1] + 1)))
        h, w = obj.shape
        mask = obj > 0
        shown = np.bincount(owner.ravel() + 1, minlength=len(total) + 1)[1:]  # visible pixels of each object
        for _ in range(PLACEMENT_TRIES):
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            if not total:
                break
            covered = np.bincount(owner[y0:y0 + h, x0:x0 + w][mask] + 1, minlength=len(total) + 1)[1:]
            if all(v >= min_visible * t for v, t in zip(shown - covered, total)):
                break
        else:
            continue  # no placement keeps the earlier objects visible enough: this object is left out
        region = canvas[y0:y0 + h, x0:x0 + w]
        if blend == "alpha":
            region[mask] = obj[mask]
        else:
            np.maximum(region, obj, out=region)
        owner[y0:y0 + h, x0:x0 + w][mask] = len(total)
        total.append(int(mask.sum()))
        boxes.append((x0, y0, x0 + w, y0 + h))
        labels.append(int(src_labels[idx]))
        sources.append(idx)
    return canvas, boxes, labels, sources


def generate(src_images: torch.Tensor, src_labels: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """The composited set of ``params`` (see :func:`composited_detection`) from a source split ``[M, 1, h, w]``
    uint8 / ``[M]`` int64, as flat tensors: ``images`` ``[N, 1, H, W]``, ``boxes`` ``[n_obj, 4]``, ``labels``,
    ``sources`` ``[n_obj]`` and ``counts`` ``[N]`` (objects per image, in image order)."""
    src = src_images[:, 0].numpy()
    lab = src_labels.numpy()
    H, W = params["canvas"]
    n = params["n_images"]
    images = np.empty((n, 1, H, W), np.uint8)
    boxes, labels, sources, counts = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([params["seed"], SPLITS[params["split"]], i])
        img, b, lbl, s = _compose(src, lab, rng, (H, W), tuple(params["objects"]), tuple(params["scale"]),
                                  params["noise"], params["blend"], params["min_visible"])
        images[i, 0] = img
        boxes += b
        labels += lbl
        sources += s
        counts.append(len(b))
    return {"images": torch.from_numpy(images), "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "sources": torch.tensor(sources, dtype=torch.int64),
            "counts": torch.tensor(counts, dtype=torch.int64)}


_TENSOR_KEYS = ("images", "boxes", "labels", "sources", "counts")


def content_hash(entry: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the dtype, shape and bytes of the set's tensors (what the cache file stores and checks)."""
    h = hashlib.sha256()
    for k in _TENSOR_KEYS:
        t = entry[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _read_cache(path: Path, params_json: str) -> tuple[dict | None, str | None]:
    """(entry, None) for a sound cache file, (None, None) when absent, (None, problem) when it must be rebuilt."""
    if not path.is_file():
        return None, None
    try:
        check_zip_integrity(path)
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file can fail in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"cannot be read ({type(e).__name__}: {first})"
    if not isinstance(entry, dict) or any(k not in entry for k in (*_TENSOR_KEYS, "sha256", "params")):
        return None, "is not a detection-set cache file"
    if entry["params"] != params_json:
        return None, "holds a set of other parameters"
    if content_hash(entry) != entry["sha256"]:
        return None, "is corrupted: the SHA-256 of its tensors does not match the stored one"
    return entry, None


def _split_per_image(flat: torch.Tensor, counts: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(flat, counts.tolist()))


def composited_detection(split: str = "train", n_images: int = 1000, canvas: int | tuple[int, int] = 96,
                         objects: int | tuple[int, int] = (1, 4), scale: int | tuple[int, int] = (14, 40),
                         seed: int = 0, *, noise: int = 0, blend: str = "alpha", min_visible: float = 0.5,
                         data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                         cache: bool = True, download: bool = True) -> DetectionSet:
    """Fashion-MNIST objects composited onto grayscale canvases, with exact boxes (see the module docstring).

    Args:
        split: ``train`` (objects from the Fashion-MNIST training split) or ``test`` (from its test split).
        n_images: number of canvases.
        canvas: canvas size ``H`` (square) or ``(H, W)``.
        objects: objects per canvas, ``(min, max)`` inclusive, or one int.
        scale: longer side of each object in pixels, ``(min, max)`` inclusive, at most the canvas size.
        seed: the random seed; the same parameters give byte-identical images and boxes.
        noise: background: 0 for black, else uniform integer noise in ``[0, noise]`` (at most 255).
        blend: ``alpha`` (an object's nonzero pixels replace what is below) or ``max`` (pixelwise maximum).
        min_visible: least share of an object's nonzero pixels left uncovered by later objects (``0``: any
            occlusion, ``1``: no object covers another's pixels).
        data_dir: where Fashion-MNIST is (default: the lookup of :func:`qcnn.data.get_data`).
        cache_dir: cache root (default ``$QCNN_CACHE`` or ``~/.cache/qcnn``); ``cache=False`` neither reads
            nor writes it.
        download: allow the download step of the Fashion-MNIST lookup.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images={n_images!r} must be a positive integer")
    H, W = _pair(canvas, "canvas")
    objects, scale = _pair(objects, "objects"), _pair(scale, "scale")
    if not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects={objects} must satisfy 1 <= min <= max")
    if not 1 <= scale[0] <= scale[1] <= min(H, W):
        raise ValueError(f"scale={scale} must satisfy 1 <= min <= max <= the canvas size {min(H, W)}")
    if isinstance(noise, bool) or not isinstance(noise, int) or not 0 <= noise <= 255:
        raise ValueError(f"noise={noise!r} must be an integer in [0, 255]")
    if blend not in BLENDS:
        raise ValueError(f"blend={blend!r} must be one of {', '.join(BLENDS)}")
    if not (isinstance(min_visible, (int, float)) and 0.0 <= min_visible <= 1.0):
        raise ValueError(f"min_visible={min_visible!r} must be in [0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative integer")
    params = {"split": split, "n_images": n_images, "canvas": [H, W], "objects": list(objects),
              "scale": list(scale), "seed": seed, "noise": noise, "blend": blend, "min_visible": float(min_visible),
              "version": GENERATOR_VERSION}
    params_json = json.dumps(params, sort_keys=True)
    classes = list(datasets.FASHION_CLASSES)

    spec = datasets.get_spec("fashion-mnist")
    look = datasets.locate(spec.name, data_dir, download=download, cache=cache_dir)
    if look.source is None:
        raise look.error()
    src = look.source
    path = None
    if cache:
        key = hashlib.sha1(f"{params_json}|{source_fingerprint(src.path)}".encode()).hexdigest()[:16]
        path = _cache_dir(cache_dir) / f"detection-fashion-{split}-{key}.pt"
        entry, problem = _read_cache(path, params_json)
        if entry is not None:
            return _to_set(entry, classes, params, f"cache {path}")
        if problem is not None:
            warnings.warn(f"detection cache file {str(path)!r} {problem}; generating the set again", stacklevel=2)

    tx, ty, vx, vy, _, _ = datasets._load_memo(spec, src, cache_dir, copy=False)
    x, y = (tx, ty) if split == "train" else (vx, vy)
    entry = generate(x, y, params)
    origin = f"generated from {src.path} ({split})"
    if path is not None:
        entry_to_save = {**entry, "params": params_json, "sha256": content_hash(entry)}
        try:
            save_atomic(entry_to_save, path)
            origin += f", cached in {path}"
        except OSError as e:
            origin += f", not cached ({e})"
    return _to_set(entry, classes, params, origin)


def _to_set(entry: dict, classes: list[str], params: dict, origin: str) -> DetectionSet:
    counts = entry["counts"]
    return DetectionSet(images=entry["images"], boxes=_split_per_image(entry["boxes"], counts),
                        labels=_split_per_image(entry["labels"], counts), classes=classes,
                        sources=_split_per_image(entry["sources"], counts), params=params, origin=origin)


# ------------------------------------------------------------------------------------------ COCO
def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class CocoDetection(torch.utils.data.Dataset):
    """Images and box annotations in COCO format: a folder of images and an instances JSON.

    The JSON must hold ``images`` (``id``, ``file_name`` relative to ``root``, optional ``width``/``height``,
    checked against the image when given), ``categories`` (``id``, ``name``) and ``annotations``
    (``image_id``, ``bbox`` ``[x, y, w, h]`` in pixels, ``category_id``, optional ``iscrowd``; other fields
    such as segmentations are ignored). Category ids, sorted, map to contiguous labels ``0..C-1``:
    ``classes[label]`` is the name, ``cat_ids[label]`` the COCO id, ``label_of[cat_id]`` the label.

    ``ds[i]`` is ``(image float32 [channels, H, W] in [0, 1], {"boxes": float32 [k, 4] xyxy, "labels": int64
    [k]})`` for the ``i``-th entry of ``images`` (file order); images without annotations have ``k = 0``. Boxes
    are converted with ``torchvision.ops.box_convert``, clipped to the image (``clip_boxes_to_image``) and
    those left with no area are dropped. ``image_size`` (``S`` or ``(H, W)``) resizes image and boxes together
    with torchvision's ``transforms.v2.functional.resize`` (bilinear, antialiased). Crowd annotations
    (``iscrowd=1``) are left out unless ``include_crowd``, which keeps them and adds ``iscrowd`` (uint8 ``[k]``)
    to every target (:func:`qcnn.detection.metrics.mean_average_precision` then ignores them, as COCO does).

    Raises ValueError naming the file for a malformed JSON, a missing image, an annotation with a bad bbox
    (not four finite numbers, or a negative width or height), an unknown ``image_id`` or ``category_id``;
    an unreadable image raises when it is loaded.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, image_size: int | tuple[int, int] |
                 None = None, channels: int = 3, include_crowd: bool = False):
        self.root, self.ann_file = Path(root), Path(ann_file)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} must be 1 or 3")
        self.channels, self.include_crowd = channels, include_crowd
        self.image_size = None if image_size is None else _pair(image_size, "image_size")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(f"image_size={image_size!r} must be positive")
        if not self.root.is_dir():
            raise FileNotFoundError(f"COCO image folder {str(self.root)!r} does not exist")
        where = str(self.ann_file)
        try:
            data = json.loads(self.ann_file.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"COCO annotation file {where!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where!r} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where!r}: a COCO instances file is a JSON object, not a {type(data).__name__}")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"{where!r}: no {key!r} list (COCO instances format: images, annotations, "
                                 "categories)")
        anns = data.get("annotations", [])
        if not isinstance(anns, list):
            raise ValueError(f"{where!r}: 'annotations' must be a list")

        cats = {}
        for c in data["categories"]:
            if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
                raise ValueError(f"{where!r}: category {c!r} needs an integer 'id' and a string 'name'")
            if c["id"] in cats:
                raise ValueError(f"{where!r}: category id {c['id']} appears twice")
            cats[c["id"]] = c["name"]
        self.cat_ids: list[int] = sorted(cats)
        self.classes: list[str] = [cats[c] for c in self.cat_ids]
        self.label_of: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}

        self.images: list[dict] = []
        pos: dict = {}
        for im in data["images"]:
            if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
                raise ValueError(f"{where!r}: image entry {im!r} needs an 'id' and a 'file_name'")
            if im["id"] in pos:
                raise ValueError(f"{where!r}: image id {im['id']!r} appears twice")
            for k in ("width", "height"):
                if k in im and (not _is_int(im[k]) or im[k] < 1):
                    raise ValueError(f"{where!r}: image {im['id']!r} has a bad {k} {im[k]!r}")
            path = self.root / im["file_name"]
            if not path.is_file():
                raise ValueError(f"{where!r}: image {im['id']!r}: file {str(path)!r} does not exist")
            pos[im["id"]] = len(self.images)
            self.images.append({"id": im["id"], "path": path, "width": im.get("width"), "height": im.get("height")})

        per_image: list[list[tuple[list[float], int, int]]] = [[] for _ in self.images]
        for a in anns:
            aid = a.get("id", "?") if isinstance(a, dict) else "?"
            if not isinstance(a, dict):
                raise ValueError(f"{where!r}: annotation {a!r} is not an object")
            if a.get("image_id") not in pos:
                raise ValueError(f"{where!r}: annotation {aid!r} refers to an unknown image_id {a.get('image_id')!r}")
            if a.get("category_id") not in self.label_of:
                raise ValueError(f"{where!r}: annotation {aid!r} has an unknown category_id {a.get('category_id')!r}")
            bbox = a.get("bbox")
            if (not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox)
                    or bbox[2] < 0 or bbox[3] < 0):
                raise ValueError(f"{where!r}: annotation {aid!r} has a bad bbox {bbox!r} (expected [x, y, w, h], "
                                 "four finite numbers with w, h >= 0)")
            crowd = a.get("iscrowd", 0)
            if crowd not in (0, 1):
                raise ValueError(f"{where!r}: annotation {aid!r} has iscrowd={crowd!r} (expected 0 or 1)")
            if crowd and not include_crowd:
                continue
            per_image[pos[a["image_id"]]].append(([float(v) for v in bbox], self.label_of[a["category_id"]],
                                                  int(crowd)))
        self._anns = per_image

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (f"CocoDetection({len(self)} images, {sum(len(a) for a in self._anns)} boxes, {self.num_classes} "
                f"classes, {str(self.ann_file)!r})")

    def target(self, i: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """Target of image ``i`` at its stored size ``(height, width)``: xyxy boxes clipped to the image, boxes
        without area dropped (before any resize)."""
        from torchvision.ops import box_convert, clip_boxes_to_image

        anns = self._anns[i]
        xywh = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = clip_boxes_to_image(box_convert(xywh, "xywh", "xyxy"), (height, width))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        t = {"boxes": boxes[keep], "labels": torch.tensor([a[1] for a in anns], dtype=torch.int64)[keep]}
        if self.include_crowd:
            t["iscrowd"] = torch.tensor([a[2] for a in anns], dtype=torch.uint8)[keep]
        return t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from PIL import Image
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        info = self.images[i]
        try:
            with Image.open(info["path"]) as im:
                img = im.convert("L" if self.channels == 1 else "RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, ...
            raise ValueError(f"image {str(info['path'])!r} cannot be decoded ({type(e).__name__}: {e})") from None
        width, height = img.size
        if (info["width"] or width) != width or (info["height"] or height) != height:
            raise ValueError(f"image {str(info['path'])!r} is {width}x{height} but {str(self.ann_file)!r} says "
                             f"{info['width']}x{info['height']}")
        target = self.target(i, height, width)
        image = F.pil_to_tensor(img)
        if self.image_size is not None and self.image_size != (height, width):
            size = list(self.image_size)
            image = F.resize(image, size, antialias=True)
            boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))
            target["boxes"] = F.resize(boxes, size).as_subclass(torch.Tensor)
        return image.float().div_(255), target


__all__ = ["CocoDetection", "DetectionSet", "composited_detection", "content_hash", "detection_collate",
           "detection_loader", "generate", "scale_object", "tight_crop"]

"""Detection loaders and bundles: the composited Fashion-MNIST detection set as a :class:`DataBundle`.

:class:`DetectionLoader` is the detection twin of :class:`~qcnn.data.loaders.TensorLoader`: the images
(uint8 ``[N, C, H, W]``) are held on the target device, each batch is indexed, optionally flipped
horizontally (boxes flipped with it: ``x0' = W - x1``, ``x1' = W - x0``) and normalised, and yields
``(x, targets)`` with ``targets`` a list of ``{"boxes" [k, 4] xyxy pixels, "labels" [k]}`` dicts on the
device. The shuffle order and flips of epoch ``e`` are a pure function of ``(seed, e)``
(``set_epoch``), ``take(n)`` keeps the first ``n`` images and ``len()`` counts batches, as for the
classification loaders, so :func:`qcnn.train.fit`, calibration and the commands use both alike.

:func:`detection_bundle` builds train / test / calibration loaders of ``fashion-detection``, the
:func:`~qcnn.data.detection.composited_detection` canvases (96 x 96, 1-4 objects of 14-40 pixels), or of
``coco``, a COCO-layout folder (``annotations/instances_train*.json`` and ``instances_val*.json`` with the
image folders they name, ``train*/`` and ``val*/``: COCO 2017 unchanged), read into memory through
:class:`~qcnn.data.detection.CocoDetection` with every image resized to ``image_size`` (default 96) and
normalised with the training images' own per-channel mean and deviation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from qcnn.data.augment import Normalize
from qcnn.data.detection import CocoDetection, DetectionSet, composited_detection
from qcnn.data.loaders import DataBundle, _Batches, epoch_seed

#: data set names the commands serve through :func:`detection_bundle`
DETECTION_SETS = ("fashion-detection", "coco")
COCO_IMAGE_SIZE = 96  #: default side the images of a COCO-format folder are resized to (``image_size``)
#: normalisation of the composited canvases (mean / std of the pixels of the default 5000 training canvases)
DETECTION_MEAN, DETECTION_STD = (0.0597,), (0.1935,)
DEFAULT_TRAIN, DEFAULT_TEST = 5000, 1000


class DetectionLoader(_Batches):
    """Batches ``(x, targets)`` of an in-memory detection set on one device (see the module docstring)."""

    def __init__(self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor], *,
                 batch_size: int, normalize: Normalize, shuffle: bool = False, flip: bool = False, seed: int = 0,
                 drop_last: bool = False, name: str = "detection"):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{name}: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if not len(images) == len(boxes) == len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(boxes)} box lists and {len(labels)} label lists")
        if len(images) == 0:
            raise ValueError(f"dataset {name} is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        dev = images.device
        self.images = images
        self.boxes = [b.to(dev, torch.float32) for b in boxes]
        self.labels = [lab.to(dev, torch.int64) for lab in labels]
        self.batch_size, self.normalize = batch_size, normalize
        self.shuffle, self.flip, self.seed, self.drop_last, self.name = shuffle, flip, seed, drop_last, name
        self.world_size, self.rank, self.epoch = 1, 0, 0

    @property
    def device(self) -> torch.device:
        return self.images.device

    def _items(self) -> int:
        return len(self.images)

    def take(self, n: int) -> DetectionLoader:
        """The same loader over the first ``n`` images (all of them if ``n`` is larger)."""
        self._check_take(n)
        return self._copy(images=self.images[:n], boxes=self.boxes[:n], labels=self.labels[:n])

    def to(self, device: str | torch.device) -> DetectionLoader:
        return self._copy(images=self.images.to(device), boxes=[b.to(device) for b in self.boxes],
                          labels=[lab.to(device) for lab in self.labels])

    def plan(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This epoch's (indices, flips) on the CPU."""
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n), None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g)
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        return order, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
        order, flips = self.plan()
        bs, width = self.batch_size, self.images.shape[-1]
        stop = (len(order) // bs) * bs if self.drop_last else len(order)
        for start in range(0, stop, bs):
            idx = order[start:min(start + bs, stop)]
            x = self.images[idx.to(self.device)]
            targets = [{"boxes": self.boxes[i], "labels": self.labels[i]} for i in idx.tolist()]
            if flips is not None:
                f = flips[start:start + len(idx)]
                if bool(f.any()):
                    fd = f.to(self.device)
                    x = torch.where(fd.view(-1, 1, 1, 1), x.flip(-1), x)
                    for t, fi in zip(targets, f.tolist()):
                        if fi:
                            b = t["boxes"]
                            t["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
            yield self.normalize(x), targets

    def __repr__(self) -> str:
        return (f"DetectionLoader({self.name}: {len(self.images)} images {tuple(self.images.shape[1:])}, "
                f"batch_size={self.batch_size}, shuffle={self.shuffle}, flip={self.flip}, device={self.device})")


def _loader(ds: DetectionSet, lo: int, hi: int, device, **kw) -> DetectionLoader:
    return DetectionLoader(ds.images[lo:hi].to(device), ds.boxes[lo:hi], ds.labels[lo:hi], **kw)


def detection_bundle(name: str = "fashion-detection", data_dir=None, batch_size: int = 64,
                     device: str | torch.device = "cpu", augment: bool = True, seed: int = 0,
                     calib_size: int = 500, *, exclude_calib: bool = False, eval_batch_size: int | None = None,
                     train_limit: int | None = None, test_limit: int | None = None, download: bool = True,
                     cache_dir=None, n_train: int = DEFAULT_TRAIN, n_test: int = DEFAULT_TEST,
                     data_seed: int = 0, image_size: int | None = None, **ignored) -> DataBundle:
    """Train / test / calibration loaders of the composited detection set.

    ``n_train`` / ``n_test`` canvases are generated (or read from the cache) with ``data_seed`` from the
    Fashion-MNIST found at ``data_dir``; ``seed`` seeds the shuffle and flips. ``augment`` flips training images
    horizontally with probability 1/2. The last ``calib_size`` training canvases form ``calib`` (fixed order,
    no flips; all of them when the set is smaller); ``exclude_calib`` removes them from ``train``. Options of
    the classification sets that do not apply (crop padding, workers) are ignored; distributed sharding is
    refused.
    """
    name = str(name).lower()
    if name not in DETECTION_SETS:
        raise ValueError(f"unknown detection data set {name!r}; choose one of {list(DETECTION_SETS)}")
    if ignored.get("world_size", 1) > 1:
        raise ValueError("the detection set has no distributed (sharded) loader; train it on one process")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if name == "coco":
        train, test = coco_sets(data_dir, image_size or COCO_IMAGE_SIZE)
        mean, std = pixel_statistics(train.images)
    else:
        common = dict(data_dir=data_dir, cache_dir=cache_dir, download=download, seed=data_seed)
        train = composited_detection("train", n_train, **common)
        test = composited_detection("test", n_test, **common)
        mean, std = DETECTION_MEAN, DETECTION_STD
    if calib_size < 0 or (exclude_calib and calib_size >= len(train)):
        raise ValueError(f"calib_size={calib_size} must be between 0 and the {len(train)} training images"
                         + (" (fewer, to leave some to train on)" if exclude_calib else ""))
    calib_size = min(calib_size, len(train))  # a small set calibrates on all its training images
    norm = Normalize(mean, std)
    eval_bs = eval_batch_size or batch_size
    n_fit = len(train) - calib_size if exclude_calib else len(train)
    train_loader = _loader(train, 0, n_fit, device, batch_size=batch_size, normalize=norm, shuffle=True,
                           flip=augment, seed=seed, name=f"{name}/train")
    test_loader = _loader(test, 0, len(test), device, batch_size=eval_bs, normalize=norm, name=f"{name}/test")
    calib = (_loader(train, len(train) - calib_size, len(train), device, batch_size=eval_bs, normalize=norm,
                     name=f"{name}/calib") if calib_size else None)
    if train_limit:
        train_loader = train_loader.take(train_limit)
    if test_limit:
        test_loader = test_loader.take(test_limit)
    h = train.images.shape[-1]
    return DataBundle(name=name, train=train_loader, test=test_loader, calib=calib, num_classes=train.num_classes,
                      in_channels=train.images.shape[1], image_size=h, mean=mean, std=std,
                      classes=list(train.classes), source=f"{train.origin}; {test.origin}", device=device)


def pixel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``[N, C, H, W]`` images, in ``[0, 1]`` units."""
    x = images.double().div(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(1).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in x.mean(1)), tuple(round(float(v), 4) for v in std)


def _coco_split(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, instances JSON) of ``split`` (``train`` / ``val``) in a COCO-layout folder ``root``."""
    anns = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    if len(anns) != 1:
        found = sorted(p.name for p in (root / "annotations").glob("*.json")) if (root / "annotations").is_dir() else []
        raise ValueError(f"COCO folder {str(root)!r}: expected one annotations/instances_{split}*.json, found "
                         f"{found or 'none'} (layout: annotations/instances_train<X>.json with images in "
                         f"train<X>/, and the same for val)")
    images = root / anns[0].stem[len("instances_"):]
    if not images.is_dir():
        raise ValueError(f"COCO folder {str(root)!r}: {anns[0].name} has no image folder {str(images)!r}")
    return images, anns[0]


def coco_sets(data_dir, image_size) -> tuple[DetectionSet, DetectionSet]:
    """The ``train`` and ``val`` splits of a COCO-layout folder read into memory, every image resized (with its
    boxes) to ``image_size``; both splits must have the same categories."""
    if data_dir is None:
        raise ValueError("--dataset coco needs --data-dir: a folder with annotations/instances_train*.json, "
                         "annotations/instances_val*.json and the image folders they name (train*/, val*/)")
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"COCO folder {str(root)!r} does not exist")
    sets = []
    for split in ("train", "val"):
        folder, ann = _coco_split(root, split)
        ds = CocoDetection(folder, ann, image_size=image_size, channels=3)
        if len(ds) == 0:
            raise ValueError(f"{str(ann)!r} lists no images")
        items = [ds[i] for i in range(len(ds))]
        images = torch.stack([torch.round(x * 255).to(torch.uint8) for x, _ in items])
        sets.append(DetectionSet(images, [t["boxes"] for _, t in items], [t["labels"] for _, t in items],
                                 list(ds.classes), origin=f"{ann}"))
    if sets[0].classes != sets[1].classes:
        raise ValueError(f"COCO folder {str(root)!r}: train and val have different categories "
                         f"({sets[0].classes} vs {sets[1].classes})")
    return sets[0], sets[1]


def is_detection_set(name: str) -> bool:
    return str(name).lower() in DETECTION_SETS


__all__ = ["DETECTION_SETS", "DetectionLoader", "coco_sets", "detection_bundle", "is_detection_set", "pixel_statistics"]

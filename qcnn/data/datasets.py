"""Known datasets, where their files are looked for, and :func:`get_data`.

Lookup order for dataset ``name`` (the first hit wins):

1. ``data_dir`` (CLI ``--data-dir``): the dataset's folder or archive itself, or a root holding ``<name>/``.
   When given, nothing else is searched (a wrong path is an error, not a silent download).
2. ``$QCNN_DATA``: a root holding ``<name>/``, ``<name>.zip`` or ``<name>-jpeg.zip``.
3. ``/usr/share/datasets/<name>`` (Debian packages, e.g. ``dataset-fashion-mnist``).
4. ``<cache>/<name>`` (an earlier download; cache = ``$QCNN_CACHE`` or ``~/.cache/qcnn``).
5. A download into ``<cache>/<name>`` with torchvision's downloader (MNIST, Fashion-MNIST, CIFAR-10).

If all fail, the error lists every place looked at and how to get the data.
"""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qcnn.data import readers
from qcnn.data.augment import Normalize
from qcnn.data.cache import cache_dir, cache_path, load_cached, save_atomic, source_fingerprint
from qcnn.data.folder import FolderDataset, eval_transform, train_transform
from qcnn.data.loaders import DataBundle, StreamLoader, TensorLoader

#: system-wide dataset roots searched after $QCNN_DATA (Debian's dataset-* packages install here)
SYSTEM_ROOTS: list[Path] = [Path("/usr/share/datasets")]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass
class Source:
    """Where a dataset was found: ``kind`` is one of idx, cifar-bin, cifar-py, folder, zip."""

    kind: str
    path: Path
    origin: str = ""

    def __str__(self) -> str:
        return f"{self.path} ({self.kind}{', ' + self.origin if self.origin else ''})"


@dataclass
class DatasetSpec:
    name: str
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int | None  #: None: counted from the class folders
    pad: int = 0  #: random-crop zero padding for training (in-memory sets)
    flip: bool = False  #: random horizontal flip for training
    streaming: bool = False  #: decoded on the fly by DataLoader workers instead of held in memory
    probe: Callable[[Path], Source | None] = lambda p: None
    download: Callable[[Path], None] | None = None
    how_to_get: str = ""
    aliases: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- probes
def _probe_idx(p: Path) -> Source | None:
    if not p.is_dir():
        return None
    for sub in (p, p / "raw", p / "FashionMNIST" / "raw", p / "MNIST" / "raw"):
        if all(readers.find_idx_file(sub, s) for pair in readers.IDX_FILES.values() for s in pair):
            return Source("idx", sub)
    return None


def _is_zip(p: Path) -> bool:
    """``p`` is a zip archive; a ``.zip`` file that is not one (random bytes, truncated) is an error naming
    it, never a silent "dataset not found"."""
    if not (p.is_file() and p.suffix.lower() == ".zip"):
        return False
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{str(p)!r} is not a readable zip archive (corrupted or truncated?)")
    return True


def _probe_folder(p: Path) -> Source | None:
    if _is_zip(p):
        return Source("zip", p)
    if p.is_dir():
        if (p / "train").is_dir():
            return Source("folder", p)
        zips = sorted(z for z in p.glob("*.zip") if _is_zip(z))
        if len(zips) == 1:
            return Source("zip", zips[0])
    return None


def _probe_cifar10(p: Path) -> Source | None:
    if p.is_dir():
        for sub in (p / "cifar-10-batches-bin", p):
            if all((sub / f).is_file() for f in readers.CIFAR_BIN_FILES["train"] + readers.CIFAR_BIN_FILES["test"]):
                return Source("cifar-bin", sub)
        for sub in (p / "cifar-10-batches-py", p):
            if all((sub / f).is_file() for f in readers.CIFAR_PY_FILES["train"] + readers.CIFAR_PY_FILES["test"]):
                return Source("cifar-py", sub)
    return _probe_folder(p)


# ----------------------------------------------------------------------------------------- downloads
def _tv_download(cls_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        root.mkdir(parents=True, exist_ok=True)
        getattr(tvd, cls_name)(str(root), train=True, download=True)
        getattr(tvd, cls_name)(str(root), train=False, download=True)

    return download


_IDX_HELP = ("  --data-dir DIR      a folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]\n"
             "  export QCNN_DATA=ROOT   with the same files in ROOT/{name}/")

DATASETS: dict[str, DatasetSpec] = {}


def _register(spec: DatasetSpec) -> None:
    DATASETS[spec.name] = spec


_register(DatasetSpec(
    "mnist", 1, 28, (0.1307,), (0.3081,), 10, pad=2, probe=_probe_idx, download=_tv_download("MNIST"),
    how_to_get="  (online) it is downloaded automatically\n" + _IDX_HELP.replace("{name}", "mnist"),
    classes=tuple(str(i) for i in range(10))))
_register(DatasetSpec(
    "fashion-mnist", 1, 28, (0.2860,), (0.3530,), 10, pad=2, probe=_probe_idx,
    download=_tv_download("FashionMNIST"),
    how_to_get=("  apt-get install dataset-fashion-mnist   (Debian/Ubuntu: installs "
                "/usr/share/datasets/fashion-mnist)\n  (online) it is downloaded automatically\n"
                + _IDX_HELP.replace("{name}", "fashion-mnist")),
    aliases=("fashion_mnist", "fashionmnist", "fmnist"), classes=FASHION_CLASSES))
_register(DatasetSpec(
    "cifar10", 3, 32, IMAGENET_MEAN, IMAGENET_STD, 10, pad=4, flip=True, probe=_probe_cifar10,
    download=_tv_download("CIFAR10"),
    how_to_get=("  (online) it is downloaded automatically (https://www.cs.toronto.edu/~kriz/cifar.html)\n"
                "  --data-dir PATH     cifar-10-batches-bin/ or cifar-10-batches-py/ (official batches), or an\n"
                "                      ImageFolder directory or zip laid out {train,test}/<class>/<image>\n"
                "  export QCNN_DATA=ROOT   with ROOT/cifar10/ (any of the above) or ROOT/cifar10.zip"),
    aliases=("cifar-10", "cifar"), classes=readers.CIFAR10_CLASSES))
_register(DatasetSpec(
    "imagenet", 3, 224, IMAGENET_MEAN, IMAGENET_STD, None, streaming=True, probe=_probe_folder,
    how_to_get=("  ImageNet cannot be downloaded automatically: get ILSVRC2012 from https://image-net.org and\n"
                "  lay it out as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, then\n"
                "  --data-dir DIR (or a zip of it), or export QCNN_DATA=ROOT with ROOT/imagenet/"),
    aliases=("ilsvrc2012",)))
_register(DatasetSpec(
    "imagefolder", 3, 224, IMAGENET_MEAN, IMAGENET_STD, None, streaming=True, probe=_probe_folder,
    how_to_get=("  --data-dir DIR      a directory or zip laid out {train,test|val}/<class>/<image>\n"
                "  export QCNN_DATA=ROOT   with ROOT/imagefolder/")))

_ALIASES = {a: s.name for s in DATASETS.values() for a in (s.name, *s.aliases)}


def list_datasets() -> list[str]:
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[_ALIASES[key]]


# ------------------------------------------------------------------------------------------- lookup
@dataclass
class Lookup:
    """Outcome of :func:`locate`: the source found (or None) and every place looked at."""

    spec: DatasetSpec
    source: Source | None
    tried: list[str] = field(default_factory=list)

    def error(self) -> FileNotFoundError:
        lines = [f"dataset '{self.spec.name}' not found. Looked in:"]
        lines += [f"  {t}" for t in self.tried]
        lines += ["Get it with one of:", self.spec.how_to_get]
        return FileNotFoundError("\n".join(lines))


def _candidates(spec: DatasetSpec, root: Path) -> list[Path]:
    names = (spec.name, *spec.aliases)
    out = [root / n for n in names]
    out += [root / f"{n}{suffix}" for n in names for suffix in (".zip", "-jpeg.zip")]
    return out


def locate(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
           cache: str | os.PathLike | None = None) -> Lookup:
    """Find (or download) the files of dataset ``name`` following the documented lookup order."""
    spec = get_spec(name)
    look = Lookup(spec, None)

    def _try(path: Path, origin: str) -> bool:
        src = spec.probe(path)
        if src is not None:
            src.origin = origin
            look.source = src
            return True
        return False

    if data_dir is not None:
        d = Path(data_dir).expanduser()
        for p in (d, *_candidates(spec, d)):
            if _try(p, "--data-dir"):
                return look
        state = "no dataset files there" if d.exists() else "does not exist"
        look.tried.append(f"--data-dir {d}: {state}")
        return look
    look.tried.append("--data-dir: not given")
    env = os.environ.get("QCNN_DATA")
    if env:
        for p in _candidates(spec, Path(env).expanduser()):
            if _try(p, "$QCNN_DATA"):
                return look
        look.tried.append(f"$QCNN_DATA={env}: no {spec.name}/ there")
    else:
        look.tried.append("$QCNN_DATA: not set")
    for root in SYSTEM_ROOTS:
        p = root / spec.name
        if _try(p, "system"):
            return look
        look.tried.append(f"{p}: {'no dataset files' if p.exists() else 'missing'}")
    target = cache_dir(cache) / spec.name
    if _try(target, "downloaded"):
        return look
    look.tried.append(f"{target}: {'no dataset files' if target.exists() else 'missing'}")
    if spec.download is None:
        look.tried.append("download: not available for this dataset")
    elif not download:
        look.tried.append("download: not attempted")
    else:
        try:
            spec.download(target)
        except Exception as e:  # offline, proxy, disk full: report, don't crash
            look.tried.append(f"download into {target}: failed ({type(e).__name__}: {e})")
        else:
            if _try(target, "downloaded"):
                return look
            look.tried.append(f"download into {target}: finished but no dataset files appeared")
    return look


# ------------------------------------------------------------------------------------------ loading
def load_arrays(spec: DatasetSpec, src: Source, cache: str | os.PathLike | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str], str]:
    """uint8 images and int64 labels of train and test, the class names, and a note on the cache."""
    classes = list(spec.classes)
    if src.kind == "idx":
        tx, ty = readers.read_idx_split(src.path, "train")
        vx, vy = readers.read_idx_split(src.path, "test")
        return tx, ty, vx, vy, classes, ""
    if src.kind == "cifar-bin":
        tx, ty = readers.read_cifar_binary([src.path / f for f in readers.CIFAR_BIN_FILES["train"]])
        vx, vy = readers.read_cifar_binary([src.path / f for f in readers.CIFAR_BIN_FILES["test"]])
        return tx, ty, vx, vy, classes, ""
    if src.kind == "cifar-py":
        tx, ty = readers.read_cifar_python([src.path / f for f in readers.CIFAR_PY_FILES["train"]])
        vx, vy = readers.read_cifar_python([src.path / f for f in readers.CIFAR_PY_FILES["test"]])
        return tx, ty, vx, vy, classes, ""
    # decoded image folder (directory or zip): cached
    mode = "L" if spec.in_channels == 1 else "RGB"
    size = (spec.image_size, spec.image_size)
    cpath = cache_path(spec.name, src.path, tag=f"{mode}{size}", root=cache)
    hit = load_cached(cpath)
    if hit is not None:
        return hit["train_x"], hit["train_y"], hit["test_x"], hit["test_y"], list(hit["classes"]), f"cache {cpath}"
    index = readers.index_image_folder(src.path, class_order=spec.classes or None)
    if "test" not in index.splits:
        raise FileNotFoundError(f"{src.path}: no test/ (or val/) split next to train/")
    tx, ty = readers.read_image_folder(index, "train", mode, size)
    vx, vy = readers.read_image_folder(index, "test", mode, size)
    entry = {"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy, "classes": list(index.classes)}
    try:
        save_atomic(entry, cpath)
        note = f"decoded, cached in {cpath}"
    except OSError as e:
        note = f"decoded, not cached ({e})"
    return tx, ty, vx, vy, list(index.classes), note


#: in-process copies of the last few in-memory datasets loaded (tests and sweeps call get_data many times)
_MEMO: OrderedDict[str, tuple] = OrderedDict()
MEMO_ENTRIES = 2


def clear_memory_cache() -> None:
    """Forget the in-process copies kept by :func:`get_data` (the next load reads the files again)."""
    _MEMO.clear()


def _load_memo(spec: DatasetSpec, src: Source, cache, copy: bool) -> tuple:
    """:func:`load_arrays` through the in-process copies. With ``copy`` the tensors returned are private
    (callers may edit them in place); without it the caller must copy them itself (e.g. to the GPU)."""
    key = f"{spec.name}|{src.kind}|{source_fingerprint(src.path)}"
    if key in _MEMO:
        _MEMO.move_to_end(key)
        tx, ty, vx, vy, classes, note = _MEMO[key]
        note = (note + "; " if note else "") + "reused"
    else:
        tx, ty, vx, vy, classes, note = _MEMO[key] = load_arrays(spec, src, cache)
        while len(_MEMO) > MEMO_ENTRIES:
            _MEMO.popitem(last=False)
    tensors = (tx, ty, vx, vy)
    if copy:
        tensors = tuple(t.clone() for t in tensors)
    return (*tensors, list(classes), note)


def _check_calib(name: str, n_train: int, calib_size: int, exclude_calib: bool = False) -> None:
    """``calib_size`` may be every training image (a PTQ-only run), unless they are also excluded from training."""
    top = n_train - 1 if exclude_calib else n_train
    if calib_size < 0 or calib_size > top:
        raise ValueError(f"calib_size={calib_size} must be in [0, {top}] for dataset {name} ({n_train} training "
                         f"images{', exclude_calib=True keeps at least one for training' if exclude_calib else ''})")


def get_data(name: str, data_dir: str | os.PathLike | None = None, batch_size: int = 128,
             device: str | torch.device = "cpu", augment: bool = True, seed: int = 0, calib_size: int = 1000, *,
             exclude_calib: bool = False, rank: int = 0, world_size: int = 1, eval_batch_size: int | None = None,
             pad: int | None = None, flip: bool | None = None, image_size: int | None = None,
             num_workers: int | None = None, drop_last: bool = False, train_limit: int | None = None,
             test_limit: int | None = None, download: bool = True,
             cache_dir: str | os.PathLike | None = None) -> DataBundle:
    """Load dataset ``name`` and return a :class:`DataBundle` of train / test / calibration loaders.

    Args:
        name: ``mnist``, ``fashion-mnist``, ``cifar10``, ``imagenet`` or ``imagefolder`` (or an alias).
        data_dir: the dataset's folder or archive, or a root holding ``<name>/`` (see module docstring).
        batch_size: training batch size; ``eval_batch_size`` (default: the same) for test and calib.
        device: where batches are produced (``"auto"``: CUDA if available); in-memory sets are moved there once.
        augment: random crop (zero padding ``pad``) and flip for the training loader; ``pad``/``flip``
            override the dataset's defaults (CIFAR-10: 4 and True; MNIST/Fashion-MNIST: 2 and False).
        seed: seeds the shuffle and augmentation; ``train.set_epoch(e)`` selects epoch ``e``'s draw.
        calib_size: the last ``calib_size`` training images form ``bundle.calib`` (fixed, no augmentation,
            independent of the seed; 0 gives ``calib=None``). ``exclude_calib`` removes them from ``train``.
        rank, world_size: DDP sharding of the training loader (disjoint, equal-size shards per epoch).
        image_size: crop size of streamed sets (default 224; eval resizes to ``image_size * 8 / 7`` first).
        num_workers: DataLoader workers of streamed sets (default ``min(8, cpu_count)``).
        train_limit, test_limit: keep only the first ``n`` images of the training loader (after removing the
            calibration tail if ``exclude_calib``) / of the test loader; the same as ``loader.take(n)``.
        download: allow the download step of the lookup.
        cache_dir: cache root for downloads and decoded images (default ``$QCNN_CACHE`` or ``~/.cache/qcnn``).
    """
    spec = get_spec(name)
    look = locate(spec.name, data_dir, download=download, cache=cache_dir)
    if look.source is None:
        raise look.error()
    src = look.source
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    for key, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size), ("train_limit", train_limit),
                   ("test_limit", test_limit)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{key}={v!r} must be a positive integer")
    eval_bs = batch_size if eval_batch_size is None else eval_batch_size
    norm = Normalize(spec.mean, spec.std)
    if spec.streaming:
        bundle = _streaming_bundle(spec, src, batch_size, eval_bs, device, augment, seed, calib_size,
                                   exclude_calib, rank, world_size, image_size or spec.image_size, num_workers,
                                   drop_last, norm)
        return _limit(bundle, train_limit, test_limit)

    tx, ty, vx, vy, classes, note = _load_memo(spec, src, cache_dir, copy=device.type == "cpu")
    if len(tx) == 0:
        raise ValueError(f"dataset {spec.name}: the training split at {src.path} is empty")
    if len(vx) == 0:
        raise ValueError(f"dataset {spec.name}: the test split at {src.path} is empty")
    if tx.shape[1] != spec.in_channels:
        raise ValueError(f"dataset {spec.name}: {src.path} has {tx.shape[1]} channels, expected {spec.in_channels}")
    _check_calib(spec.name, len(tx), calib_size, exclude_calib)
    tx, ty, vx, vy = (t.to(device) for t in (tx, ty, vx, vy))
    n_train = len(tx) - calib_size if exclude_calib else len(tx)
    common = dict(normalize=norm, seed=seed)
    train = TensorLoader(tx[:n_train], ty[:n_train], batch_size=batch_size, shuffle=True,
                         pad=(spec.pad if pad is None else pad) if augment else 0,
                         flip=(spec.flip if flip is None else flip) if augment else False,
                         rank=rank, world_size=world_size, drop_last=drop_last, name=f"{spec.name}/train", **common)
    test = TensorLoader(vx, vy, batch_size=eval_bs, name=f"{spec.name}/test", **common)
    calib = None
    if calib_size:
        calib = TensorLoader(tx[len(tx) - calib_size:], ty[len(tx) - calib_size:], batch_size=eval_bs,
                             name=f"{spec.name}/calib", **common)
    bundle = DataBundle(
        name=spec.name, train=train, test=test, calib=calib, num_classes=spec.num_classes or len(classes),
        in_channels=spec.in_channels, image_size=int(tx.shape[-1]), mean=spec.mean, std=spec.std,
        classes=classes, source=f"{src}" + (f"; {note}" if note else ""), device=device)
    return _limit(bundle, train_limit, test_limit)


def _limit(bundle: DataBundle, train_limit: int | None, test_limit: int | None) -> DataBundle:
    if train_limit is not None:
        bundle.train = bundle.train.take(train_limit)
    if test_limit is not None:
        bundle.test = bundle.test.take(test_limit)
    return bundle


def _streaming_bundle(spec, src, batch_size, eval_bs, device, augment, seed, calib_size, exclude_calib, rank,
                      world_size, image_size, num_workers, drop_last, norm) -> DataBundle:

    index = readers.index_image_folder(src.path)
    if "test" not in index.splits:
        raise FileNotFoundError(f"{src.path}: no val/ (or test/) split next to train/")
    for split in ("train", "test"):
        if not index.splits[split]:
            raise ValueError(f"dataset {spec.name}: the {split} split at {src.path} is empty")
    n = len(index.splits["train"])
    _check_calib(spec.name, n, calib_size, exclude_calib)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    ev = eval_transform(image_size)
    train_ds = FolderDataset(index, "train", train_transform(image_size) if augment else ev)
    common = dict(normalize=norm, device=device, seed=seed, num_workers=workers)
    n_train = n - calib_size if exclude_calib else n
    train = StreamLoader(train_ds, batch_size=batch_size, shuffle=True, rank=rank, world_size=world_size,
                         drop_last=drop_last, indices=range(n_train), name=f"{spec.name}/train", **common)
    test = StreamLoader(FolderDataset(index, "test", ev), batch_size=eval_bs, name=f"{spec.name}/test", **common)
    calib = None
    if calib_size:
        calib = StreamLoader(FolderDataset(index, "train", ev), batch_size=eval_bs, indices=range(n - calib_size, n),
                             name=f"{spec.name}/calib", **common)
    return DataBundle(
        name=spec.name, train=train, test=test, calib=calib, num_classes=len(index.classes), in_channels=3,
        image_size=image_size, mean=spec.mean, std=spec.std, classes=list(index.classes), source=str(src),
        device=device)


def describe(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = False,
             cache: str | os.PathLike | None = None) -> dict:
    """What ``qcnn datasets`` prints for one dataset: where it was found (or where it was looked for and how
    to get it), image counts read from file headers or archive listings, size on disk, decoded-cache state."""
    spec = get_spec(name)
    look = locate(name, data_dir, download=download, cache=cache)
    info: dict = {"name": spec.name, "classes": spec.num_classes, "channels": spec.in_channels,
                  "image_size": spec.image_size, "storage": "streamed" if spec.streaming else "in memory",
                  "found": look.source is not None}
    if look.source is None:
        info["looked_in"] = look.tried
        info["how_to_get"] = spec.how_to_get
        return info
    src = look.source
    info.update(path=str(src.path), format=src.kind, origin=src.origin)
    files = [src.path] if src.path.is_file() else [p for p in src.path.rglob("*") if p.is_file()]
    info["bytes"] = sum(p.stat().st_size for p in files)
    train = test = None
    if src.kind == "idx":
        train = readers.idx_count(readers.find_idx_file(src.path, readers.IDX_FILES["train"][0]))
        test = readers.idx_count(readers.find_idx_file(src.path, readers.IDX_FILES["test"][0]))
    elif src.kind == "cifar-bin":
        train = sum((src.path / f).stat().st_size for f in readers.CIFAR_BIN_FILES["train"]) // readers.CIFAR_RECORD
        test = sum((src.path / f).stat().st_size for f in readers.CIFAR_BIN_FILES["test"]) // readers.CIFAR_RECORD
    elif src.kind in ("zip", "folder"):
        index = readers.index_image_folder(src.path, class_order=spec.classes or None)
        train, test = len(index.splits.get("train", ())), len(index.splits.get("test", ()))
        info["classes"] = len(index.classes)
        if not spec.streaming:
            mode = "L" if spec.in_channels == 1 else "RGB"
            cpath = cache_path(spec.name, src.path, tag=f"{mode}{(spec.image_size, spec.image_size)}", root=cache)
            info["decoded_cache"] = str(cpath) if cpath.is_file() else None
    info.update(train=train, test=test)
    return info

"""Readers for the on-disk dataset formats, each returning uint8 tensors ``[N, C, H, W]`` and int64 labels.

* IDX (MNIST, Fashion-MNIST): ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` raw or ``.gz``.
  Header: two zero bytes, a type byte (``0x08`` = uint8), the number of dimensions, then one big-endian
  int32 per dimension.
* CIFAR-10 binary batches (``cifar-10-batches-bin``): records of 3073 bytes, one label byte then
  1024 red, 1024 green and 1024 blue bytes, each plane row-major 32x32.
* CIFAR-10 python batches (``cifar-10-batches-py``, what torchvision downloads): pickled dicts with
  ``data`` (N x 3072 uint8, same plane order) and ``labels``.
* ImageFolder layouts ``{train,test}/<class>/<image>`` in a directory or a zip archive, decoded with
  torchvision's JPEG decoder or PIL.
  Within a split the images are ordered round-robin over the classes (the first image of every class, then
  the second, ...), so every prefix and every tail of the split is class-balanced.
"""

from __future__ import annotations

import gzip
import io
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
#: split folder names accepted for the evaluation split, in order of preference
TEST_SPLITS = ("test", "val", "valid", "validation")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_RECORD = 1 + 3 * 32 * 32


# ----------------------------------------------------------------------------------------------- IDX
def _open_maybe_gz(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        raw = f.read()
    return gzip.decompress(raw) if head == b"\x1f\x8b" else raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a uint8 array of the shape its header states."""
    path = Path(path)
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4].hex()})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not supported (only 0x08 = uint8)")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {dims} = {expected} bytes but the file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def idx_count(path: str | os.PathLike) -> int:
    """Number of items an IDX file declares (reads only the header)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(8)
    return int.from_bytes(head[4:8], "big")


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def find_idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_split(folder: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, H, W]`` uint8 and labels ``[N]`` int64 of the ``train`` or ``test`` split."""
    folder = Path(folder)
    paths = []
    for stem in IDX_FILES[split]:
        p = find_idx_file(folder, stem)
        if p is None:
            raise FileNotFoundError(f"{folder}: missing {stem}[.gz]")
        paths.append(p)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ------------------------------------------------------------------------------------------ CIFAR-10
CIFAR_BIN_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR_PY_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def read_cifar_binary(paths: Sequence[str | os.PathLike]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate CIFAR-10 binary batch files into ``[N, 3, 32, 32]`` uint8 images and int64 labels."""
    xs, ys = [], []
    for p in paths:
        raw = Path(p).read_bytes()
        if len(raw) == 0 or len(raw) % CIFAR_RECORD:
            raise ValueError(f"{p}: size {len(raw)} is not a positive multiple of the {CIFAR_RECORD}-byte record")
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    labels = np.concatenate(ys)
    if labels.max(initial=0) > 9:
        raise ValueError(f"{paths[0]}: label {int(labels.max())} outside 0..9; not a CIFAR-10 binary batch")
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(labels)


#: the only globals a CIFAR-10 python batch needs: numpy's array reconstruction (dicts, lists, str and
#: bytes are pickle's own opcodes)
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_CIFAR_PICKLE_GLOBALS` (no code can run while loading)."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(f"{self.where}: refusing to load a pickle that references {module}.{name}: a CIFAR-10 "
                         "python batch holds only dicts, lists, strings and numpy arrays")


def read_cifar_python(paths: Sequence[str | os.PathLike]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate CIFAR-10 python (pickle) batches, read with a restricted unpickler: only dicts, lists,
    strings, bytes and numpy arrays are rebuilt, any other global is refused with an error naming the file."""
    xs, ys = [], []
    for p in paths:
        with open(p, "rb") as f:
            try:
                d = _RestrictedUnpickler(f, str(p)).load()
            except (pickle.UnpicklingError, EOFError) as e:
                raise ValueError(f"{p}: not a readable CIFAR-10 python batch ({e})") from e
        if not isinstance(d, dict):
            raise ValueError(f"{p}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict)")
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{p}: not a CIFAR-10 python batch (no 'data'/'labels' keys)")
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


# --------------------------------------------------------------------------------------- ImageFolder
@dataclass
class FolderIndex:
    """The files of an ImageFolder layout: ``splits[split] = [(member, class_index), ...]`` in load order."""

    root: Path  #: directory or zip archive
    prefix: str  #: folder inside the zip (or "") holding the split folders
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]

    @property
    def is_zip(self) -> bool:
        return self.root.is_file()


def _round_robin(per_class: list[list[str]]) -> list[tuple[str, int]]:
    out = []
    longest = max((len(v) for v in per_class), default=0)
    for k in range(longest):
        for c, files in enumerate(per_class):
            if k < len(files):
                out.append((files[k], c))
    return out


def index_image_folder(root: str | os.PathLike, class_order: Sequence[str] | None = None) -> FolderIndex:
    """Index ``root`` (a directory or a zip archive) laid out as ``[prefix/]{train,test}/<class>/<image>``.

    ``class_order`` fixes the class indices when the folder names are a permutation of it (CIFAR-10);
    otherwise classes are the sorted folder names of the training split.
    """
    root = Path(root)
    names: list[str]
    if root.is_file():
        if not zipfile.is_zipfile(root):
            raise ValueError(f"{root} is neither a directory nor a zip archive")
        with zipfile.ZipFile(root) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    elif root.is_dir():
        names = []
        for dirpath, _, files in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            for f in files:
                names.append(f if rel == "." else f"{rel}/{f}".replace(os.sep, "/"))
    else:
        raise FileNotFoundError(f"{root} does not exist")
    names = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS) and "__MACOSX" not in n]
    # tree: prefix -> split -> class -> files
    tree: dict[str, dict[str, dict[str, list[str]]]] = {}
    for n in names:
        parts = n.split("/")
        if len(parts) < 3:
            continue
        prefix, split, cls = "/".join(parts[:-3]), parts[-3].lower(), parts[-2]
        tree.setdefault(prefix, {}).setdefault(split, {}).setdefault(cls, []).append(n)
    for prefix, splits in sorted(tree.items(), key=lambda kv: len(kv[0])):
        if "train" not in splits:
            continue
        test = next((s for s in TEST_SPLITS if s in splits), None)
        found = sorted(splits["train"])
        if class_order is not None and sorted(class_order) == found:
            classes = list(class_order)
        else:
            classes = found
        index = {c: i for i, c in enumerate(classes)}
        out = {}
        for split_name, key in (("train", "train"), ("test", test)):
            if key is None:
                continue
            per_class = [[] for _ in classes]
            for cls, files in splits[key].items():
                if cls not in index:
                    raise ValueError(f"{root}: class folder {key}/{cls} has no counterpart in train/")
                per_class[index[cls]] = sorted(files)
            out[split_name] = _round_robin(per_class)
        return FolderIndex(root, prefix, classes, out)
    raise FileNotFoundError(f"{root}: no ImageFolder layout found (expected train/<class>/<image>, test/<class>/...)")


def _jpeg_decoder(mode: str):
    """torchvision's libjpeg-turbo decoder over a list of JPEG blobs (pixel-identical to PIL's on the same
    library, with far less per-image overhead), or None when unavailable."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    read_mode = ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB

    def decode(blobs: list[bytes]) -> list[torch.Tensor]:
        return decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], mode=read_mode)

    return decode


def decode_images(
    read: Callable[[str], bytes],
    members: Sequence[str],
    mode: str,
    size: tuple[int, int] | None = None,
    threads: int | None = None,
    where: str = "",
) -> torch.Tensor:
    """Decode images into one uint8 tensor ``[N, C, H, W]``; all must share one size.

    ``read`` returns the bytes of a member (reading is sequential). Chunks of images are decoded on
    ``threads`` threads (the decoders release the GIL): a chunk of JPEGs by torchvision's decoder in one
    call, anything else (or a chunk it refuses) image by image with PIL."""
    from PIL import Image

    if not members:
        raise ValueError(f"{where}: no images to decode")
    channels = {"L": 1, "RGB": 3}[mode]
    jpeg = _jpeg_decoder(mode)

    def _pil(name: str, blob: bytes) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(blob)) as im:
                arr = np.array(im.convert(mode), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, ...
            raise ValueError(f"{where}: image {name!r} cannot be decoded ({type(e).__name__}: {e})") from None
        return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels)).permute(2, 0, 1)

    def _decode(items: list[tuple[str, bytes]]) -> list[torch.Tensor]:
        if jpeg is not None and all(b[:2] == b"\xff\xd8" for _, b in items):
            try:
                return jpeg([b for _, b in items])
            except RuntimeError:
                pass
        return [_pil(n, b) for n, b in items]

    def _check(items, tensors, shape):
        for (name, _), t in zip(items, tensors):
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: {name} is {t.shape[-1]}x{t.shape[-2]}, expected {shape[2]}x{shape[1]} "
                                 "(use the streaming 'imagefolder' dataset for images of mixed sizes)")

    first = _decode([(members[0], read(members[0]))])[0]
    shape = (channels, *(size if size is not None else first.shape[-2:]))
    _check([(members[0], b"")], [first], shape)
    out = torch.empty((len(members), *shape), dtype=torch.uint8)
    out[0] = first

    def _chunk(start: int, items: list[tuple[str, bytes]]) -> None:
        tensors = _decode(items)
        _check(items, tensors, shape)
        torch.stack(tensors, out=out[start:start + len(items)])

    threads = threads or min(8, os.cpu_count() or 1)
    chunk = 1024
    with ThreadPoolExecutor(threads) as pool:
        jobs = []
        for start in range(1, len(members), chunk):
            part = members[start:start + chunk]
            jobs.append(pool.submit(_chunk, start, [(m, read(m)) for m in part]))
        for j in jobs:
            j.result()
    return out


def _zip_member_reader(z: zipfile.ZipFile, mm: mmap.mmap) -> Callable[[str], bytes]:
    """``read(member)`` for a zip: stored (uncompressed) members are sliced straight out of the memory-mapped
    archive after their local header (30 bytes + name + extra field) and checked against their CRC-32;
    compressed ones go through ``zipfile``. Several times cheaper than ``ZipFile.read`` per small member."""
    infos = {i.filename: i for i in z.infolist()}

    def read(name: str) -> bytes:
        info = infos[name]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            return z.read(name)
        off = info.header_offset
        if mm[off:off + 4] != b"PK\x03\x04":
            raise ValueError(f"{z.filename}: bad local header for {name}")
        n_name, n_extra = struct.unpack_from("<HH", mm, off + 26)
        start = off + 30 + n_name + n_extra
        data = mm[start:start + info.compress_size]
        if zlib.crc32(data) != info.CRC:
            raise ValueError(f"{z.filename}: CRC mismatch in {name} (corrupt archive)")
        return data

    return read


def read_image_folder(index: FolderIndex, split: str, mode: str = "RGB",
                      size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split of an indexed ImageFolder into memory."""
    if split not in index.splits:
        raise FileNotFoundError(f"{index.root}: no '{split}' split (looked for {('train',) + TEST_SPLITS})")
    members = [m for m, _ in index.splits[split]]
    labels = torch.tensor([c for _, c in index.splits[split]], dtype=torch.int64)
    where = f"{index.root} [{split}]"
    if index.is_zip:
        with zipfile.ZipFile(index.root) as z, open(index.root, "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            x = decode_images(_zip_member_reader(z, mm), members, mode, size, where=where)
    else:
        x = decode_images(lambda m: (index.root / m).read_bytes(), members, mode, size, where=where)
    return x, labels

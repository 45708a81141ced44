"""Loaders: iterables of normalised ``(x, y)`` batches already on the target device.

:class:`TensorLoader` serves a dataset held in memory as uint8 ``[N, C, H, W]`` (moved to the device once):
each batch is indexed from it, augmented with batched tensor ops (:mod:`qcnn.data.augment`) and
normalised. :class:`StreamLoader` wraps a ``torch.utils.data.DataLoader`` with workers for image sets too
large for memory. Both have the same interface:

* ``len(loader)`` = number of batches, ``loader.num_samples`` = number of images per epoch (this rank);
* ``loader.set_epoch(e)``: the shuffle order and augmentation of epoch ``e`` are a pure function of
  ``(seed, e)`` (a ``torch.Generator`` seeded from both), so runs are reproducible and epochs differ;
* ``loader.take(n)``: a loader over the first ``n`` images of the same split (quick runs, calibration);
* sharding for DDP: a training loader built with ``rank``/``world_size`` shuffles the whole split with the
  common seed, drops the last ``N mod world_size`` images of that permutation and gives rank ``r`` the
  ``r``-th contiguous block, so shards are disjoint and of equal length (equal numbers of steps per rank).
  Only shuffled (training) loaders are sharded; evaluation loaders give every rank the whole split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from qcnn.data.augment import Normalize, crop_flip


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed derived from ``(seed, epoch)`` (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_shard(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, {world_size})")


class _Batches:
    """What both loaders share: sharded sample count, batch count, epoch, and shallow copies."""

    batch_size: int
    drop_last: bool
    shuffle: bool
    world_size: int
    epoch: int

    def _items(self) -> int:
        raise NotImplementedError

    @property
    def num_samples(self) -> int:
        n = self._items()
        return n // self.world_size if (self.world_size > 1 and self.shuffle) else n

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _copy(self, **changes):
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.__dict__.update(changes)
        return out

    @staticmethod
    def _check_take(n: int) -> None:
        if n < 1:
            raise ValueError(f"take(n={n}): n must be >= 1")


class TensorLoader(_Batches):
    """Batches from in-memory uint8 images ``[N, C, H, W]`` and int64 labels ``[N]``.

    ``pad`` > 0 enables the random crop (translation with zero fill, see :func:`crop_flip`), ``flip``
    the random horizontal flip; both draw from the epoch's generator. Without ``shuffle`` the order is the
    stored one and nothing random happens.

    On the CPU a batch is produced on ``cpu_threads`` intra-op threads (default 1): its ops are small and
    memory-bound, and spreading them over OpenMP threads costs more CPU time than it saves, many times more
    on a busy machine. ``cpu_threads=None`` keeps the caller's setting.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, normalize: Normalize,
                 shuffle: bool = False, pad: int = 0, flip: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, name: str = "data", cpu_threads: int | None = 1):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"{name}: images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError(f"dataset {name} is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if pad < 0:
            raise ValueError(f"pad={pad} must be >= 0")
        _check_shard(rank, world_size)
        if len(images) < world_size:
            raise ValueError(f"dataset {name} has {len(images)} images, fewer than world_size={world_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.normalize = batch_size, normalize
        self.shuffle, self.pad, self.flip = shuffle, pad, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last, self.name, self.cpu_threads = drop_last, name, cpu_threads
        self.epoch = 0

    # -- interface -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.images.device

    def _items(self) -> int:
        return len(self.images)

    def take(self, n: int) -> TensorLoader:
        """The same loader over the first ``n`` images of the split (all of them if ``n`` is larger)."""
        self._check_take(n)
        return self._copy(images=self.images[:n], labels=self.labels[:n])

    def to(self, device: str | torch.device) -> TensorLoader:
        return self._copy(images=self.images.to(device), labels=self.labels.to(device))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of the loader, normalised, in stored order, without augmentation: ``(x, y)``."""
        return self.normalize(self.images), self.labels

    # -- iteration -------------------------------------------------------------------------------
    def plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This epoch's (indices, shifts, flips) for this rank, all on the CPU."""
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n), None, None
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g)
        shifts = torch.randint(-self.pad, self.pad + 1, (n, 2), generator=g) if self.pad else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        if self.world_size > 1:
            per = n // self.world_size
            sl = slice(self.rank * per, (self.rank + 1) * per)
            order = order[sl]
            shifts = shifts[sl] if shifts is not None else None
            flips = flips[sl] if flips is not None else None
        return order, shifts, flips

    def _batch_threads(self):
        """Produce CPU batches on ``cpu_threads`` intra-op threads, restoring the caller's setting after
        each batch (the consumer's own ops are unaffected)."""
        if self.device.type != "cpu" or not self.cpu_threads or torch.get_num_threads() == self.cpu_threads:
            return contextlib.nullcontext()
        return _threads(self.cpu_threads)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, shifts, flips = self.plan()
        dev = self.device
        bs = self.batch_size
        stop = (len(order) // bs) * bs if self.drop_last else len(order)
        if not self.shuffle:
            for start in range(0, stop, bs):
                with self._batch_threads():
                    x = self.normalize(self.images[start:start + bs])
                yield x, self.labels[start:start + bs]
            return
        # the epoch's plan goes to the device once, so producing a batch never waits for the device
        order = order.to(dev)
        shifts = shifts.to(dev) if shifts is not None else None
        flips = flips.to(dev) if flips is not None else None
        for start in range(0, stop, bs):
            end = min(start + bs, stop)
            with self._batch_threads():
                idx = order[start:end]
                x, y = self.images[idx], self.labels[idx]
                if shifts is not None or flips is not None:
                    x = crop_flip(x, None if shifts is None else shifts[start:end],
                                  None if flips is None else flips[start:end], self.pad)
                x = self.normalize(x)
            yield x, y

    def __repr__(self) -> str:
        aug = f", pad={self.pad}, flip={self.flip}" if self.shuffle else ""
        shard = f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return (f"TensorLoader({self.name}: {len(self.images)} images {tuple(self.images.shape[1:])}, "
                f"batch_size={self.batch_size}, shuffle={self.shuffle}{aug}{shard}, device={self.device})")


class _ShardSampler(torch.utils.data.Sampler):
    """Index sampler of :class:`StreamLoader`: same permutation rule as :class:`TensorLoader`."""

    def __init__(self, loader: StreamLoader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader.plan().tolist())

    def __len__(self):
        return self.loader.num_samples


def _worker_message(text: str) -> str:
    """The message of an exception raised in a DataLoader worker (e.g. an image that cannot be decoded, with
    its file named), out of the text the main process receives: "Caught ... Original Traceback ...\n
    <type>: <message>". The worker's traceback is an internal detail, not an error message."""
    lines = text.rstrip().splitlines()
    i = max((k for k, line in enumerate(lines) if line.startswith("  File ")), default=-1) + 1
    while i < len(lines) and lines[i].startswith("    "):  # the last frame's source line and ^^^ marks
        i += 1
    return "\n".join(lines[i:] or lines[-1:]).split(": ", 1)[-1]


class StreamLoader(_Batches):
    """Batches streamed from disk by a ``DataLoader`` with workers; the dataset yields uint8 ``[C, H, W]``
    tensors (its transforms do the decoding, resizing and random crops), the batch is moved to the device
    and normalised there. Random transforms in the workers are seeded from the epoch generator, so a fixed
    ``num_workers`` gives reproducible epochs."""

    def __init__(self, dataset, *, batch_size: int, normalize: Normalize, device: str | torch.device = "cpu",
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 4, drop_last: bool = False, indices: Sequence[int] | None = None,
                 name: str = "data"):
        _check_shard(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.dataset, self.batch_size, self.normalize = dataset, batch_size, normalize
        self.device = torch.device(device)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.num_workers, self.drop_last, self.name = num_workers, drop_last, name
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        if not self.indices:
            raise ValueError(f"dataset {name} is empty")
        self.epoch = 0

    def _items(self) -> int:
        return len(self.indices)

    def take(self, n: int) -> StreamLoader:
        self._check_take(n)
        return self._copy(indices=self.indices[:n])

    def plan(self) -> torch.Tensor:
        idx = torch.tensor(self.indices)
        if not self.shuffle:
            return idx
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        idx = idx[torch.randperm(len(idx), generator=g)]
        if self.world_size > 1:
            per = len(idx) // self.world_size
            idx = idx[self.rank * per:(self.rank + 1) * per]
        return idx

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch) ^ 0x5EED)
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=_ShardSampler(self), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", drop_last=self.drop_last, generator=g,
            persistent_workers=False, prefetch_factor=4 if self.num_workers > 0 else None)
        nb = self.device.type == "cuda"
        try:
            for x, y in dl:
                yield self.normalize(x.to(self.device, non_blocking=nb)), y.to(self.device, non_blocking=nb)
        except Exception as e:  # noqa: BLE001 - re-raised, without the worker's traceback
            text = str(e)
            if "Original Traceback" not in text:
                raise
            raise type(e)(_worker_message(text)) from None

    def __repr__(self) -> str:
        return (f"StreamLoader({self.name}: {len(self.indices)} images, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, workers={self.num_workers}, device={self.device})")


Loader = TensorLoader | StreamLoader


@dataclass
class DataBundle:
    """What :func:`qcnn.data.get_data` returns: the three loaders and the facts a model needs."""

    name: str
    train: Loader
    test: Loader
    calib: Loader | None  #: last ``calib_size`` training images, no augmentation, fixed order (None if 0)
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    source: str = ""  #: where the data came from (path, and whether the decoded cache was used)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the network's input (the same normalisation the loaders apply)."""
        return self.train.normalize(x_uint8)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Network input -> pixel values in [0, 255] (float)."""
        return self.train.normalize.inverse(x)

    def take(self, n: int) -> DataBundle:
        """A bundle whose train, test and calibration loaders hold at most their first ``n`` images."""
        return subset(self, n)


def subset(obj: Loader | DataBundle, n: int) -> Loader | DataBundle:
    """First ``n`` images of a loader, or of each loader of a bundle (quick runs and smoke tests)."""
    if isinstance(obj, DataBundle):
        return replace(obj, train=obj.train.take(n), test=obj.test.take(n),
                       calib=obj.calib.take(n) if obj.calib is not None else None)
    return obj.take(n)

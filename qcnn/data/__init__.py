"""Datasets as iterables of normalised ``(x, y)`` batches on the target device.

>>> from qcnn.data import get_data
>>> data = get_data("cifar10", data_dir="../shared/data/cifar10-jpeg.zip", batch_size=128, device="cuda")
>>> for epoch in range(epochs):
...     data.train.set_epoch(epoch)
...     for x, y in data.train: ...
>>> data.calib            # last 1000 training images, fixed order, no augmentation
>>> data.test.take(500)   # first 500 test images

Small sets (MNIST, Fashion-MNIST, CIFAR-10) are held in memory as uint8 ``[N, C, H, W]`` and augmented
batch-wise with tensor ops; ImageFolder sets (``imagenet``, ``imagefolder``) stream through a DataLoader.
See ``docs/data.md``.
"""

from qcnn.data.augment import Normalize, crop_flip, hflip, translate
from qcnn.data.cache import cache_dir
from qcnn.data.datasets import (
    DATASETS,
    DatasetSpec,
    Source,
    clear_memory_cache,
    describe,
    get_data,
    get_spec,
    list_datasets,
    locate,
)
from qcnn.data.detection_loaders import DetectionLoader, detection_bundle
from qcnn.data.loaders import DataBundle, StreamLoader, TensorLoader, subset

__all__ = [
    "DATASETS", "DataBundle", "DatasetSpec", "DetectionLoader", "Normalize", "Source", "StreamLoader", "TensorLoader",
    "cache_dir", "clear_memory_cache", "crop_flip", "describe", "detection_bundle", "get_data", "get_spec", "hflip",
    "list_datasets", "locate", "subset", "translate",
]

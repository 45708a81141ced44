"""Streaming ImageFolder dataset (directory or zip) for sets too large to hold in memory (ImageNet).

Transforms are the standard ImageNet ones, ending in uint8 tensors (normalisation happens on the device):
training ``RandomResizedCrop(size)`` + ``RandomHorizontalFlip()``; evaluation ``Resize(size * 8 / 7)``
(256 for 224) + ``CenterCrop(size)``.
"""

from __future__ import annotations

import io
import os
import zipfile

import torch
from torchvision import transforms as T

from qcnn.data.readers import FolderIndex


def train_transform(size: int = 224):
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])


def eval_transform(size: int = 224):
    return T.Compose([T.Resize(round(size * 8 / 7)), T.CenterCrop(size), T.PILToTensor()])


class FolderDataset(torch.utils.data.Dataset):
    """``(uint8 [3, H, W], label)`` pairs of one split of a :class:`FolderIndex`. A zip archive is opened
    once per worker process (zip handles are not shared across processes)."""

    def __init__(self, index: FolderIndex, split: str, transform):
        self.index, self.split, self.transform = index, split, transform
        self.samples = index.splits[split]
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, member: str) -> bytes:
        if not self.index.is_zip:
            return (self.index.root / member).read_bytes()
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.index.root), os.getpid()
        return self._zip.read(member)

    def __getitem__(self, i: int):
        from PIL import Image

        member, label = self.samples[i]
        try:
            with Image.open(io.BytesIO(self._read(member))) as im:
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, ...
            raise ValueError(f"{self.index.root}: image {member!r} cannot be decoded "
                             f"({type(e).__name__}: {e})") from None
        return self.transform(img), label

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_pid"] = None, -1
        return state

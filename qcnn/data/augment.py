"""Batched augmentation and normalisation as tensor ops on the device (no per-sample Python loop).

Random crop with zero padding ``p`` (torchvision's ``RandomCrop(H, padding=p)``) equals a translation of
the image by ``(dy, dx)`` drawn uniformly from ``[-p, p]^2``, filling uncovered pixels with 0:

    out[c, i, j] = x[c, i + dy, j + dx]   if 0 <= i + dy < H and 0 <= j + dx < W, else 0

which :func:`crop_flip` computes for a whole batch with two gathers from the padded batch. Flips mirror the
width axis of the selected images. Normalisation maps uint8 pixels to ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, shifts: torch.Tensor | None, flips: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Translate each image of ``x`` ``[B, C, H, W]`` by its row ``(dy, dx)`` of ``shifts`` ``[B, 2]``
    (integers in ``[-pad, pad]``, zero fill), then mirror the width axis where the bool ``flips`` ``[B]`` is
    true. Either may be None. Two ``torch.gather`` calls (rows, then columns, the flip folded into the column
    index); any dtype, including uint8; no host synchronisation."""
    if shifts is None and flips is None:
        return x
    b, c, h, w = x.shape
    dev = x.device
    if shifts is None:
        pad = 0
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    col = torch.arange(w, device=dev)[None, :].expand(b, w)
    if flips is not None:
        col = torch.where(flips.to(dev)[:, None], (w - 1) - col, col)
    if shifts is None:
        return torch.gather(xp, 3, col[:, None, None, :].expand(b, c, h, w))
    shifts = shifts.to(dev)
    rows = torch.arange(h, device=dev)[None, :] + (pad + shifts[:, 0:1])  # [B, H]
    cols = col + (pad + shifts[:, 1:2])  # [B, W]
    xr = torch.gather(xp, 2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return torch.gather(xr, 3, cols[:, None, None, :].expand(b, c, h, w))


def translate(x: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Shift every image of ``x`` by its row ``(dy, dx)`` of ``shifts`` (in ``[-pad, pad]``), zero fill."""
    return crop_flip(x, shifts, None, pad)


def hflip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror (width axis) the images of ``x`` whose entry in the bool ``mask`` ``[B]`` is true."""
    return crop_flip(x, None, mask, 0)


class Normalize:
    """uint8 ``[B, C, H, W]`` -> float32 ``(x / 255 - mean) / std`` as one multiply-subtract."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} differ in length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std {tuple(std)} must be positive")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _consts(self, device: torch.device):
        if device not in self._cache:
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._cache[device] = (1.0 / (255.0 * std), mean / std)
        return self._cache[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._consts(x.device)
        return x.float().mul_(scale).sub_(shift)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float -> pixel values in [0, 255] (float)."""
        scale, shift = self._consts(x.device)
        return (x + shift) / scale


#: area range of the random crops of :func:`calibration_views` (a fraction of the image)
VIEW_SCALE = (0.35, 1.0)


def calibration_views(x: torch.Tensor, copies: int, seed: int = 0) -> list[torch.Tensor]:
    """More views of a few calibration images ``x`` ``[B, C, H, W]`` (already normalised) for post-training
    steps that fit many parameters to them (learned rounding): ``x`` itself, its mirror image and ``copies``
    batches in which each image is a random crop of ``VIEW_SCALE`` of its area and aspect ratio 3/4..4/3,
    resized back to ``H x W`` (torchvision's ``RandomResizedCrop``, bilinear, antialiased) and mirrored with
    probability 1/2. The same ``seed`` gives the same views; the global random state is left as it was."""
    from torchvision.transforms import v2

    if x.dim() != 4:
        raise ValueError(f"calibration views need image batches [B, C, H, W], got a tensor of shape "
                         f"{tuple(x.shape)}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ValueError(f"copies={copies!r} must be an integer >= 0")
    crop = v2.RandomResizedCrop(tuple(x.shape[-2:]), scale=VIEW_SCALE, antialias=True)
    out = [x, x.flip(-1)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(copies):
            out.append(torch.stack([crop(im.flip(-1) if bool(torch.rand(()) < 0.5) else im) for im in x]))
    return out

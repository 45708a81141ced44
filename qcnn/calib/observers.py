"""Range estimators (observers), kept apart from quantizers.

An observer sees tensors through :meth:`Observer.update` (vectorised, streaming over batches) and answers
:meth:`Observer.compute_range` with the real interval ``[lo, hi]`` a ``bits``-bit grid should cover.
State lives in buffers so a calibrated model's ``state_dict`` round-trips.

* ``minmax``: running min and max.
* ``ema``: exponential moving average of the per-batch min and max,
  ``m <- gamma * m + (1 - gamma) * batch_min`` (gamma = 0.999 as in FQN / Jacob et al.), first batch taken
  as is; a batch whose min or max is not finite is skipped, so one NaN batch cannot poison the range.

Histogram-based estimators (percentile, MSE, KL) live in :mod:`qcnn.calib.histogram`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str):
    def deco(cls):
        OBSERVERS[name] = cls
        cls.name = name
        return cls

    return deco


def make_observer(name: str, axis: int | None = None, **kwargs) -> Observer:
    """Build the observer registered as ``name``; unknown names list the valid ones."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown calibration method {name!r}; choose one of {sorted(OBSERVERS)}")
    return OBSERVERS[name](axis=axis, **kwargs)


def check_finite(x: Tensor, what: str = "calibration data") -> None:
    """Raise ValueError if ``x`` holds NaN or Inf (a host sync: only call in calibration mode)."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(f"{what} contains non-finite values: {n_nan} NaN and {n_inf} Inf")


def reduce_minmax(x: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """Min and max over all elements (axis None) or per slice along ``axis``."""
    if axis is None:
        return torch.aminmax(x.detach())
    flat = x.detach().transpose(0, axis).reshape(x.shape[axis], -1)
    return torch.aminmax(flat, dim=1)


class Observer(nn.Module):
    """Base observer. ``axis`` selects per-channel statistics (None = per tensor)."""

    name = "observer"

    def __init__(self, axis: int | None = None):
        super().__init__()
        self.axis = axis
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def is_initialized(self) -> bool:
        return bool(self.count > 0)

    def update(self, x: Tensor) -> None:
        raise NotImplementedError

    def compute_range(self, bits: int, signed: bool) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class _MinMaxBase(Observer):
    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.register_buffer("min_val", torch.zeros(0))
        self.register_buffer("max_val", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # buffers are created lazily with the observed shape: accept whatever shape was saved
        for k in ("min_val", "max_val"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def compute_range(self, bits: int, signed: bool) -> tuple[Tensor, Tensor]:
        if not self.is_initialized():
            raise RuntimeError(f"{type(self).__name__} has observed no data yet")
        return self.min_val, self.max_val

    def current_range(self) -> tuple[Tensor, Tensor]:
        """``(min, max)`` without the check that data was observed (a host read): for the training step,
        right after an update."""
        return self.min_val, self.max_val


@register_observer("minmax")
class MinMaxObserver(_MinMaxBase):
    """Running minimum and maximum over every tensor seen."""

    def update(self, x: Tensor) -> None:
        lo, hi = reduce_minmax(x, self.axis)
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self.count += 1


@register_observer("ema")
class EMAObserver(_MinMaxBase):
    """Exponential moving average of batch min/max: ``m <- gamma m + (1 - gamma) m_batch``."""

    def __init__(self, axis: int | None = None, gamma: float = 0.999):
        super().__init__(axis)
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"EMA gamma={gamma!r} must lie in [0, 1)")
        self.gamma = gamma

    def update(self, x: Tensor) -> None:
        self.update_range(*reduce_minmax(x, self.axis))

    def update_range(self, lo: Tensor, hi: Tensor) -> None:
        """Average in one batch's range ``[lo, hi]`` (its min/max, or another per-batch estimate)."""
        if self.min_val.numel() == 0:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:  # a batch with NaN / Inf leaves the average as it was (no host sync)
            ok = torch.isfinite(lo) & torch.isfinite(hi)
            self.min_val = torch.where(ok, self.min_val * self.gamma + lo * (1 - self.gamma), self.min_val)
            self.max_val = torch.where(ok, self.max_val * self.gamma + hi * (1 - self.gamma), self.max_val)
        self.count += 1

    def extra_repr(self) -> str:
        return f"axis={self.axis}, gamma={self.gamma}"

"""The quantizer contract shared by every method.

A quantizer is an ``nn.Module`` that maps a float tensor to its fake-quantized float tensor of the same
shape. Its backward is the straight-through estimator or the method's own rule, documented in the method
file. Learnable parameters (PACT alpha, LSQ step) are parameters, calibrated ranges are buffers, so a
``state_dict`` round-trips. Every quantizer describes its grid through :meth:`Quantizer.grid`; integer
inference and export read only that description.

Calibration is an explicit mode: inside :func:`qcnn.calib.calibrating` quantizers with an observer record
statistics and pass their input through unchanged; on leaving the mode they compute their parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qcnn.quant import kernels
from qcnn.quant.kernels import _tracing  # noqa: F401 - the quantizers' one test for torch.compile / export

MIN_BITS = 1
MAX_BITS = 16


def check_bits(bits: int, name: str = "bits", lo: int = MIN_BITS, hi: int = MAX_BITS) -> int:
    """Return ``bits`` as int, or raise ValueError naming the bad value."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{name}={bits!r} is not supported: expected an integer in [{lo}, {hi}]")
    return bits


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer code range of a ``bits``-bit grid; ``narrow`` drops the most negative code."""
    if signed:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return (lo + 1 if narrow else lo), hi
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


@torch.no_grad()
def geometric_mse_search(x: Tensor, top: Tensor | float, quantize, n_grid: int = 161) -> Tensor:
    """The threshold ``t`` among ``top 10^(-4 k / (n_grid - 1))`` (``k = 0..n_grid-1``; a geometric grid, as
    activations have rare huge outliers) minimising ``mean (quantize(x, t) - x)^2``: the MSE-optimal clip of
    calibration data (PACT's ``init_mse`` alpha, LSQ's ``init: mse`` activation step)."""
    cands = torch.logspace(-4, 0, n_grid, device=x.device) * top
    errs = torch.stack([(quantize(x, t) - x).pow(2).mean() for t in cands])
    return cands[int(errs.argmin())]


def binary_sign(x: Tensor) -> Tensor:
    """sign with sign(0) = +1 (two levels, never 0): the forward of every binary quantizer."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


_SIGN_BACKWARDS: dict = {}


def _sign_backward(grad_fn):
    """The backward kernel ``(g, x) -> g * grad_fn(x)`` of :func:`sign_with_grad`, one per ``grad_fn`` (so that
    :mod:`qcnn.quant.kernels` compiles it once), named after it."""
    bwd = _SIGN_BACKWARDS.get(grad_fn)
    if bwd is None:
        def bwd(g: Tensor, x: Tensor) -> Tensor:
            return g * grad_fn(x).to(g.dtype)

        bwd.__qualname__ = f"_sign_backward[{grad_fn.__name__}]"
        _SIGN_BACKWARDS[grad_fn] = bwd
    return bwd


class _SignFn(torch.autograd.Function):
    """:func:`binary_sign` forward, ``g * grad_fn(x)`` backward, both through :mod:`qcnn.quant.kernels`."""

    @staticmethod
    def forward(ctx, x, backward_kernel):
        ctx.save_for_backward(x)
        ctx.backward_kernel = backward_kernel
        return kernels.call(binary_sign, x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return kernels.call(ctx.backward_kernel, g.contiguous(), x), None


def sign_with_grad(x: Tensor, grad_fn) -> Tensor:
    """:func:`binary_sign` forward; backward ``g * grad_fn(x)`` (the surrogate derivative of a binary method:
    Bi-Real's ApproxSign, DoReFa's ``|x| <= 1`` mask, ...). ``grad_fn`` should be a module-level function
    (its fused backward kernel is compiled once per function). The kernel is looked up here, outside the
    autograd Function, so that a first call under torch.compile has no side effect inside it (a graph break)."""
    return _SignFn.apply(x, _sign_backward(grad_fn))


def sign_ste(x: Tensor) -> Tensor:
    """sign(x) with sign(0) = +1 forward, identity backward."""
    return x + (binary_sign(x) - x).detach()


@dataclass
class Grid:
    """What a quantizer's output can be: ``value = scale * (code - zero_point)`` for uniform grids,
    ``value = levels[code]`` for codebook (non-uniform) grids.

    ``scale``/``zero_point`` are 0-d tensors (per-tensor) or 1-d along ``axis`` (per-channel).
    ``fl`` is the fixed-point fractional length when the scale is ``2**-fl`` (QCode).
    ``levels`` is the sorted codebook in real units for non-uniform quantizers; ``int_levels`` and
    ``scale`` give its single-scale integer representation where the method has one.
    """

    bits: int
    signed: bool
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    axis: int | None = None
    qmin: int | None = None
    qmax: int | None = None
    fl: Tensor | None = None
    levels: Tensor | None = None
    int_levels: Tensor | None = None

    def __post_init__(self):
        if self.qmin is None or self.qmax is None:
            self.qmin, self.qmax = qrange(self.bits, self.signed)

    @property
    def is_uniform(self) -> bool:
        return self.levels is None

    def _bcast(self, t: Tensor, ndim: int) -> Tensor:
        if t.dim() == 0 or self.axis is None:
            return t
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def integer_view(self) -> Grid | None:
        """This grid as a uniform ``(scale, zero point 0)`` grid with integer codes, or None where it has none.

        A uniform grid is its own view. A codebook whose levels are exactly ``scale * int_levels`` with one
        scale (DoReFa / PACT weights: the odd codes ``{-n, -n+2, ..., n}`` with ``scale = 1/n`` or ``E/n``; the
        binary ``{-E, +E}`` as codes ``{-1, +1}``) is viewed as the uniform grid ``scale * c`` on
        ``[min int_levels, max int_levels]``; its codes are that codebook's integers (the codes between them are
        simply unused), and ``bits`` is the container width the code range needs (``k + 1`` bits for k-bit
        DoReFa weights). Codebooks that only approximate ``scale * int_levels`` (the non-uniform quantizer's)
        or have no integer form have no view.
        """
        if self.levels is None:
            return self
        if self.int_levels is None or self.scale is None or self.scale.numel() != 1:
            return None
        ints = self.int_levels.detach().to(torch.float64).reshape(-1)
        s = float(self.scale.detach().reshape(-1)[0])
        lv = self.levels.detach().to(torch.float64).reshape(-1)
        if s <= 0 or ints.numel() != lv.numel() or not torch.equal(ints, ints.round()):
            return None
        if not torch.allclose(lv, ints * s, rtol=1e-6, atol=1e-6 * s):
            return None
        lo, hi = int(ints.min()), int(ints.max())
        width = max(1, math.ceil(math.log2(hi - lo + 1)))
        return Grid(bits=width, signed=lo < 0, scale=self.scale.detach().clone().reshape(()),
                    zero_point=torch.tensor(0, dtype=torch.int32), qmin=lo, qmax=hi)

    def real_codes(self, x: Tensor) -> Tensor:
        """``x / scale + zero_point`` on a uniform grid, not rounded nor clipped (the codes ``x`` falls between);
        0 + zero point in a channel of scale 0."""
        s = self._bcast(self.scale.to(x.device), x.dim())
        z = self._bcast(self.zero_point.to(x.device), x.dim()) if self.zero_point is not None else 0
        zero = s == 0
        return torch.where(zero, torch.zeros_like(x), x / torch.where(zero, torch.ones_like(s), s)) + z

    def to_codes(self, x: Tensor) -> Tensor:
        """Integer codes (int32) of an on-grid tensor ``x``. A channel of scale 0 (e.g. the Bi-Real / ELQ
        grid of an all-zero output channel) holds only the value 0: its codes are the zero point (0), not
        the int32 cast of ``0 / 0``."""
        if self.levels is not None:
            lv = self.levels.to(x.device, x.dtype)
            return torch.argmin((x.unsqueeze(-1) - lv).abs(), dim=-1).to(torch.int32)
        return torch.round(self.real_codes(x)).clamp(self.qmin, self.qmax).to(torch.int32)

    def from_codes(self, q: Tensor) -> Tensor:
        """Real values of integer codes."""
        if self.levels is not None:
            return self.levels.to(q.device)[q.long()]
        s = self._bcast(self.scale.to(q.device), q.dim())
        z = self._bcast(self.zero_point.to(q.device), q.dim()) if self.zero_point is not None else 0
        return (q.float() - z) * s


class Quantizer(nn.Module):
    """Base class: ``forward(x)`` returns the fake-quantized ``x``; ``grid()`` describes the output grid.

    Subclasses set ``bits`` and ``signed``. Quantizers that need calibration own an ``observer`` (see
    :mod:`qcnn.calib`) and override :meth:`is_initialized` and :meth:`finish_calibration`.
    """

    bits: int
    signed: bool
    #: True while inside :func:`qcnn.calib.calibrating`: observe, do not quantize.
    observing: bool = False

    def __init__(self, bits: int, signed: bool):
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = bool(signed)

    def is_initialized(self) -> bool:
        return True

    def finish_calibration(self) -> None:
        """Turn observed statistics into quantization parameters (called when calibration ends)."""

    def grid(self) -> Grid:
        raise NotImplementedError(f"{type(self).__name__} does not describe its grid")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"

    def _require_initialized(self) -> bool:
        """Raise if the quantizer is not calibrated; returns whether the check ran (not under torch.export /
        torch.compile, where reading the flag on the host is a data-dependent guard: the first eager call
        checks instead)."""
        if _tracing():
            return False
        if not self.is_initialized():
            raise RuntimeError(
                f"{type(self).__name__} is used before calibration: run the model inside "
                "qcnn.calib.calibrating(model) on some data first (or load a calibrated state_dict)"
            )
        return True


class ScaleBufferMixin:
    """Weight quantizers whose ``scale`` buffer (recomputed from the weight at every forward) may be per
    tensor or per channel: loading a state_dict takes the saved shape."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "scale" in state_dict:
            self.scale = torch.empty_like(state_dict[prefix + "scale"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GradientQuantizer(nn.Module):
    """A module that is the identity forward and quantizes the gradient flowing back through it.

    Subclasses implement :meth:`quantize_grad`. Used for DoReFa's gradient quantizer and WAGE's errors.
    """

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits, "grad bits")

    def quantize_grad(self, g: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return _GradQuantFn.apply(x, self)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class _GradQuantFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod = mod
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.mod.quantize_grad(g), None

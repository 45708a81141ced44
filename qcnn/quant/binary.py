"""Bi-Real Net binarization (Liu et al., "Bi-Real Net", ECCV 2018, arXiv 1808.00278).

Activations (:class:`ApproxSignQuantizer`)
    Forward ``a_b = sign(a)`` with ``sign(0) = +1`` (values {-1, +1}).
    Backward ApproxSign, the derivative of the piecewise-quadratic approximation of sign::

        d a_b / d a = 2 + 2a   for -1 <= a < 0
                      2 - 2a   for  0 <= a < 1
                      0        otherwise

Weights (:class:`MagnitudeAwareBinaryWeight`)
    Forward ``W_b = s_o * sign(W_r)`` with ``s_o = mean|W_r|`` over output channel ``o`` (``sign(0) = +1``).
    Backward, the magnitude-aware gradient of the paper (eq. 7, with ``s_o`` treated as a constant)::

        dL/dW_r[o, ...] = dL/dW_b[o, ...] * s_o * 1{|W_r[o, ...]| < 1}

    The factor ``s_o`` differs between output channels, so under SGD (``dW = -lr dL/dW``, momentum keeps the
    ratio) channel ``o`` moves ``s_o`` times as far as with the plain STE; Adam's per-element normalisation
    ``m / sqrt(v)`` divides any per-channel constant out again, which is why the recipe trains with SGD.
    ``s_o`` is accumulated in float64 and rounded to the weight's dtype, so ``Q(Q(W)) = Q(W)`` exactly
    (``|W_b|`` is ``s_o`` everywhere in its channel and the float64 mean of equal float32 values is exact):
    a model rebuilt from its binary weights alone (``qcnn compress``) computes bit for bit the same.

Architecture and training (real-valued shortcut around every binary conv, two-step training) live in
:mod:`qcnn.models.bireal` and :mod:`qcnn.methods.bireal`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, binary_sign, sign_with_grad


def approx_sign_grad(x: Tensor) -> Tensor:
    """``d ApproxSign / dx``: ``2 + 2x`` on [-1, 0), ``2 - 2x`` on [0, 1), 0 elsewhere."""
    return torch.where((x >= -1) & (x < 0), 2 + 2 * x, torch.where((x >= 0) & (x < 1), 2 - 2 * x, torch.zeros_like(x)))


def approx_sign(x: Tensor) -> Tensor:
    """sign(x) forward, ApproxSign backward."""
    return sign_with_grad(x, approx_sign_grad)


def _channel_mean_abs(w: Tensor) -> Tensor:
    """``s_o = mean|W[o, ...]|`` per output channel (keepdim), accumulated in float64, in ``w``'s dtype."""
    dims = tuple(range(1, w.dim()))
    return w.abs().double().mean(dim=dims, keepdim=True).to(w.dtype) if dims else w.abs()


def _mag_binary_forward(w: Tensor) -> tuple[Tensor, Tensor]:
    """(``s sign(w)``, ``s``) with ``s`` the per-channel :func:`_channel_mean_abs`: the kernel, reduction included."""
    s = _channel_mean_abs(w)
    return s * binary_sign(w), s


def _mag_binary_backward(g: Tensor, w: Tensor, s: Tensor) -> Tensor:
    """The magnitude-aware gradient ``g s [|w| < 1]``, the mask recomputed from ``w``."""
    return g * s * (w.abs() < 1).to(g.dtype)


class _MagBinaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        y, s = kernels.call(_mag_binary_forward, w)
        ctx.mark_non_differentiable(s)
        ctx.save_for_backward(w, s)
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        w, s = ctx.saved_tensors
        return kernels.call(_mag_binary_backward, g.contiguous(), w, s)


def magnitude_aware_binary(w: Tensor) -> Tensor:
    """``mean|W| (per output channel) * sign(W)`` with the magnitude-aware gradient."""
    return _MagBinaryFn.apply(w)[0]


def _binary_levels_grid(scale: Tensor, axis: int | None) -> Grid:
    return Grid(bits=1, signed=True, scale=scale, zero_point=torch.zeros_like(scale, dtype=torch.int32), axis=axis,
                qmin=-1, qmax=1, int_levels=torch.tensor([-1, 1]))


class ApproxSignQuantizer(Quantizer):
    """Binary activation: sign forward, ApproxSign backward (module docstring). Levels {-1, +1}."""

    def __init__(self):
        super().__init__(1, signed=True)

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x)

    def grid(self) -> Grid:
        return _binary_levels_grid(torch.tensor(1.0), None)


class MagnitudeAwareBinaryWeight(Quantizer):
    """Binary weight ``mean|W_r| sign(W_r)`` per output channel with the magnitude-aware gradient.

    ``grid()`` reads the scale off the last weight seen (``scale * {-1, +1}`` per output channel, codes +-1).
    """

    def __init__(self):
        super().__init__(1, signed=True)
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        y, s = _MagBinaryFn.apply(w)
        self.scale = s.flatten().detach()
        return y

    def grid(self) -> Grid:
        return _binary_levels_grid(self.scale.detach().clone(), 0 if self.scale.dim() else None)


__all__ = ["ApproxSignQuantizer", "MagnitudeAwareBinaryWeight", "approx_sign", "approx_sign_grad",
           "magnitude_aware_binary"]

"""WAGE: training and inference with integers (Wu, Li, Chen, Shi, ICLR 2018, arXiv 1802.04680).

Weights, activations, gradients and errors all live on fixed-point grids. Notation (paper section 3,
official TensorFlow code ``source/Quantize.py``)::

    sigma(k) = 2^(1-k)                               smallest step of a k-bit grid
    Q(x, k)  = round(x * 2^(k-1)) / 2^(k-1)          (k = 1: sign(x))
    C(x, k)  = clip(x, -1 + sigma(k), 1 - sigma(k))  (k = 1: clip to [-1, 1])
    Shift(x) = 2^round(log2 x)                       nearest power of two

W (weights, :class:`WageWeightQuantizer`)
    Forward ``W_q = Q(C(W, kW), kW) / alpha`` with the per-layer constant ``alpha = max(Shift(Lmin / L), 1)``,
    ``L = sqrt(3 / fan_in)`` (the code's variance-scaling init; the paper writes 6), ``Lmin = 1.5 sigma(kW)``.
    The official code divides only when ``alpha > 1.8``, i.e. ``alpha >= 2``; for ``alpha = 1`` it is a no-op, so
    both agree. Backward: identity, ``dW_q/dW = 1`` (neither the clip, the rounding nor 1/alpha is
    differentiated; the code's ``x + stop_gradient(y - x)``). Initialisation ``U(-max(L, Lmin), max(L, Lmin))``
    followed by ``W <- C(Q(W, kW), kW)``, and ``W <- C(W, kW)`` after every step (:func:`wage_init`,
    :func:`wage_clip_`).

A (activations, :class:`WageActQuantizer`)
    Forward ``a_q = Q(C(a, kA), kA)``. Backward: STE that keeps the clip mask,
    ``da_q/da = 1`` if ``|a| <= 1 - sigma(kA)`` else 0.

E (errors, :class:`WageErrorQuantizer`, a :class:`~qcnn.quant.base.GradientQuantizer`)
    Identity forward; backward replaces the error ``e = dL/da`` by ``Q(C(e / Shift(max|e|), kE), kE)``
    (max over the whole tensor, batch included). The magnitude ``Shift(max|e|)`` is *not* restored, as in
    the official code: every layer sees an error of order one, and G below is scale free anyway.
    The official network applies E after every ReLU (before A) and on the network output; here E is
    applied inside every hidden layer's activation quantizer in that order (A's clip mask first, then E,
    going backward) and as the output quantizer of the last layer.

G (weight updates, :class:`WageSGD`)
    ``g_n = g / Shift(max|g|)``; ``u = Q(lr * g_n, kR)`` with ``kR = 16`` (the code's ``bitsR``); stochastic
    rounding to an integer, ``u' = sign(u) (floor|u| + Bernoulli(frac|u|))``; update
    ``dW = u' / 2^(kG-1)`` and ``W <- C(W - dW, kW)``. Plain SGD (no momentum, no weight decay): the learning
    rate sits inside the quantized update (the official run uses lr 8, 1, 1/8 at epochs 0, 200, 250).
    Consequently the stored weights live on the kG-bit fixed-point grid (multiples of ``2^(1-kG)``) inside
    ``C(., kW)``, a kG-bit accumulator as in the paper, and the weights every forward pass uses,
    ``Q(C(W, kW), kW)``, lie on the kW-bit grid (for kW = 2 the ternary ``{-0.5, 0, 0.5}``).

Loss: sum of squared errors ``0.5 * sum_c (onehot - out)^2`` (:func:`sse_loss`); no BatchNorm, no bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qcnn.quant import kernels
from qcnn.quant.base import GradientQuantizer, Grid, Quantizer, check_bits

#: bits of the fine quantization applied to ``lr * g_n`` before stochastic rounding (the code's ``bitsR``)
BITS_R = 16
_TINY = 2.0**-100


def sigma(k: int) -> float:
    """Smallest step of a k-bit WAGE grid, ``2^(1-k)``."""
    return 2.0 ** (1 - k)


def wage_q(x: Tensor, k: int) -> Tensor:
    """``Q(x, k) = round(x 2^(k-1)) / 2^(k-1)`` (sign for k = 1; identity for k > 15, as the code)."""
    if k == 1:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    if k > 15:
        return x
    s = 2.0 ** (k - 1)
    return torch.round(x * s) / s


def wage_c(x: Tensor, k: int) -> Tensor:
    """``C(x, k) = clip(x, -1 + sigma(k), 1 - sigma(k))`` (no margin for k = 1 or k > 15)."""
    d = 0.0 if (k == 1 or k > 15) else sigma(k)
    return torch.clamp(x, -1.0 + d, 1.0 - d)


def shift(x: Tensor) -> Tensor:
    """``Shift(x) = 2^round(log2 x)``; ``x = 0`` maps to a tiny power of two (never NaN)."""
    return torch.exp2(torch.round(torch.log2(torch.clamp(x, min=_TINY))))


def layer_limits(fan_in: int, w_bits: int) -> tuple[float, float]:
    """``(L, Lmin)`` of a layer: ``L = sqrt(3 / fan_in)``, ``Lmin = 1.5 sigma(kW)``."""
    if fan_in < 1:
        raise ValueError(f"fan_in={fan_in!r} must be positive")
    return math.sqrt(3.0 / fan_in), 1.5 * sigma(w_bits)


def layer_alpha(fan_in: int, w_bits: int) -> float:
    """WAGE layer scale ``alpha = max(Shift(Lmin / L), 1)`` (a power of two)."""
    lim, lmin = layer_limits(fan_in, w_bits)
    return max(2.0 ** round(math.log2(lmin / lim)), 1.0)


def fan_in_of(module: nn.Module) -> int:
    w = module.weight
    return int(w[0].numel())


def _qc_consts(k: int) -> tuple[float, float | None, bool]:
    """``(d, s, sign)`` of ``Q(C(., k), k)`` as Python constants: margin ``d`` of C, scale ``s = 2^(k-1)`` of Q
    (None: Q is the identity, k > 15), ``sign``: Q is sign (k = 1). Kernels take these rather than ``k``, so
    that the compiled code has constants, not a symbolic ``2^(k-1)`` per element."""
    d = 0.0 if (k == 1 or k > 15) else sigma(k)
    return d, (None if (k == 1 or k > 15) else 2.0 ** (k - 1)), k == 1


def _qc(x: Tensor, d: float, s: float | None, sign: bool) -> Tensor:
    """``Q(C(x, k), k)`` from :func:`_qc_consts` (the same ops as :func:`wage_q` of :func:`wage_c`)."""
    c = torch.clamp(x, -1.0 + d, 1.0 - d)
    if sign:
        return torch.where(c >= 0, torch.ones_like(c), -torch.ones_like(c))
    return c if s is None else torch.round(c * s) / s


def _wage_weight_forward(w: Tensor, inv_alpha: Tensor, d: float, s: float | None, sign: bool) -> Tensor:
    """``Q(C(W, kW), kW) / alpha``: the weight kernel."""
    return _qc(w, d, s, sign) * inv_alpha


def _wage_act_forward(x: Tensor, d: float, s: float | None, sign: bool) -> Tensor:
    """``Q(C(a, kA), kA)``, written ``c + (Q(c) - c)`` as the straight-through expression it replaces."""
    c = torch.clamp(x, -1.0 + d, 1.0 - d)
    return c + (_qc(c, d, s, sign) - c)


def _wage_act_backward(g: Tensor, x: Tensor, d: float) -> Tensor:
    """``g [|a| <= 1 - sigma(kA)]``: the clip's gradient (both ends included, as ``torch.clamp``'s)."""
    return torch.where((x >= -1.0 + d) & (x <= 1.0 - d), g, torch.zeros_like(g))


def _wage_error(g: Tensor, d: float, s: float | None, sign: bool) -> Tensor:
    """E: ``Q(C(e / Shift(max|e|), kE), kE)``, the max reduced in the same kernel."""
    return _qc(g / shift(g.abs().amax()), d, s, sign)


def _wage_act_error_backward(g: Tensor, x: Tensor, d: float, ed: float, es: float | None, esign: bool) -> Tensor:
    """A's clip mask (margin ``d``), then E (constants ``ed, es, esign``), going backward: one kernel."""
    return _wage_error(_wage_act_backward(g, x, d), ed, es, esign)


class _WageWeightFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, inv_alpha):
        return kernels.call(_wage_weight_forward, w, inv_alpha, *_qc_consts(bits))

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _WageActFn(torch.autograd.Function):
    """A (and E before it, ``e_bits`` not None): saves ``a``, the clip mask is recomputed backward."""

    @staticmethod
    def forward(ctx, x, bits: int, e_bits: int | None):
        ctx.save_for_backward(x)
        ctx.bits = (bits, e_bits)
        return kernels.call(_wage_act_forward, x, *_qc_consts(bits))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        bits, e_bits = ctx.bits
        d = _qc_consts(bits)[0]
        if e_bits is None:
            return kernels.call(_wage_act_backward, g.contiguous(), x, d), None, None
        return kernels.call(_wage_act_error_backward, g.contiguous(), x, d, *_qc_consts(e_bits)), None, None


class WageWeightQuantizer(Quantizer):
    """``W_q = Q(C(W, kW), kW) / alpha``, identity backward (see module docstring)."""

    def __init__(self, bits: int = 2, fan_in: int = 1, alpha: float | None = None):
        super().__init__(check_bits(bits, "w_bits", 1, 15), signed=True)
        self.fan_in = int(fan_in)
        a = layer_alpha(self.fan_in, bits) if alpha is None else float(alpha)
        if a <= 0:
            raise ValueError(f"alpha={a!r} must be positive")
        self.register_buffer("alpha", torch.tensor(a))

    def forward(self, w: Tensor) -> Tensor:
        return _WageWeightFn.apply(w, self.bits, 1.0 / self.alpha)

    def grid(self) -> Grid:
        if self.bits == 1:
            scale = 1.0 / self.alpha
            return Grid(bits=1, signed=True, scale=scale.detach().clone(),
                        zero_point=torch.zeros((), dtype=torch.int32), qmin=-1, qmax=1,
                        int_levels=torch.tensor([-1, 1]))
        n = 2 ** (self.bits - 1)
        return Grid(bits=self.bits, signed=True, scale=(1.0 / (n * self.alpha)).detach().clone(),
                    zero_point=torch.zeros((), dtype=torch.int32), qmin=-(n - 1), qmax=n - 1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha):g}"


class WageErrorQuantizer(GradientQuantizer):
    """E: identity forward; backward ``Q(C(e / Shift(max|e|), kE), kE)``."""

    def quantize_grad(self, g: Tensor) -> Tensor:
        return kernels.call(_wage_error, g.contiguous(), *_qc_consts(self.bits))

    def grid(self) -> Grid:
        n = 2 ** (self.bits - 1)
        return Grid(bits=self.bits, signed=True, scale=torch.tensor(1.0 / n),
                    zero_point=torch.zeros((), dtype=torch.int32), qmin=-(n - 1), qmax=n - 1)


class WageActQuantizer(Quantizer):
    """A: ``Q(C(a, kA), kA)`` with the clip-masked STE; with ``e_bits`` the error quantizer E sits in front
    (forward order ``E -> A`` as the official ``relu -> E -> A``), so going backward the clip mask comes first,
    then E."""

    def __init__(self, bits: int = 8, e_bits: int | None = 8):
        super().__init__(check_bits(bits, "a_bits", 1, 15), signed=True)
        self.error = WageErrorQuantizer(e_bits) if e_bits is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if not (x.requires_grad and torch.is_grad_enabled()):
            return kernels.call(_wage_act_forward, x, *_qc_consts(self.bits))
        return _WageActFn.apply(x, self.bits, None if self.error is None else self.error.bits)

    def grid(self) -> Grid:
        if self.bits == 1:
            return Grid(bits=1, signed=True, levels=torch.tensor([-1.0, 1.0]), scale=torch.tensor(1.0),
                        int_levels=torch.tensor([-1, 1]))
        n = 2 ** (self.bits - 1)
        return Grid(bits=self.bits, signed=True, scale=torch.tensor(1.0 / n),
                    zero_point=torch.zeros((), dtype=torch.int32), qmin=-(n - 1), qmax=n - 1)


def wage_update(g: Tensor, lr: float, g_bits: int, generator: torch.Generator | None = None) -> Tensor:
    """The quantized weight update ``dW`` of gradient ``g`` (G of the module docstring):
    ``sign(u) (floor|u| + Bernoulli(frac|u|)) / 2^(kG-1)`` with ``u = Q(lr g / Shift(max|g|), 16)``."""
    gn = g / shift(g.abs().amax())
    u = wage_q(lr * gn, BITS_R)
    a = u.abs()
    lo = torch.floor(a)
    r = torch.rand(a.shape, device=a.device, dtype=a.dtype, generator=generator)
    return torch.sign(u) * (lo + (r < (a - lo)).to(a.dtype)) / 2.0 ** (g_bits - 1)


__all__ = ["BITS_R", "WageActQuantizer", "WageErrorQuantizer", "WageWeightQuantizer", "layer_alpha", "layer_limits",
           "shift", "sigma", "wage_c", "wage_q", "wage_update"]

"""Integer requantization (Jacob et al., arXiv 1712.05877, section 2.2; gemmlowp fixed-point primitives).

A real multiplier ``M > 0`` (``s_in * s_w / s_out``) is stored as an int32 ``M0`` and an exponent ``e``::

    M = M0 * 2^(e - 31),   M0 in [2^30, 2^31)   (i.e. M0 / 2^31 in [0.5, 1), as in the paper)

``quantize_multiplier`` computes ``(M0, e)`` with ``frexp`` exactly as TFLite's ``QuantizeMultiplier``
(round half away from zero, ``M0 = 2^31`` renormalised). Applying it to an int32 value ``x`` is
``multiply_by_quantized_multiplier``::

    RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^max(e, 0), M0), max(-e, 0))

* ``SaturatingRoundingDoublingHighMul(a, b) = trunc((a*b + nudge) / 2^31)`` with ``nudge = 2^30`` if
  ``a*b >= 0`` else ``1 - 2^30`` (C integer division truncates toward zero); ``a = b = -2^31`` saturates to
  ``2^31 - 1``. This is ``round(a * b / 2^31)`` with ties away from zero.
* ``RoundingDivideByPOT(x, n) = (x >> n) + (remainder > threshold)`` with ``remainder = x & (2^n - 1)``,
  ``threshold = (2^n - 1) >> 1`` plus one for negative ``x``: ``round(x / 2^n)``, ties away from zero.

Everything runs on int64 torch tensors (the int32 products of the paper need 64 bits), so the functions are
bit-exact with the reference C++ for int32 inputs. ``pack_int4`` / ``unpack_int4`` store codes of grids with
at most 4 bits two per byte (low nibble first, codes offset by ``qmin`` to ``0..15``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def quantize_multiplier(m: Tensor | float) -> tuple[Tensor, Tensor]:
    """Int32 multiplier and exponent of a real multiplier ``m >= 0`` (elementwise over a tensor).

    Returns ``(M0, e)`` as int64 tensors with ``m ~= M0 * 2^(e - 31)``; ``m = 0`` gives ``(0, 0)``.
    """
    m = torch.as_tensor(m, dtype=torch.float64)
    if bool((m < 0).any()) or not bool(torch.isfinite(m).all()):
        raise ValueError(f"requantization multipliers must be finite and >= 0, got {m.flatten()[:8].tolist()}")
    mant, exp = torch.frexp(m)  # m = mant * 2^exp, mant in [0.5, 1)
    q = torch.floor(mant * 2.0**31 + 0.5)  # round half away from zero (mant >= 0)
    carry = q == 2.0**31
    q = torch.where(carry, q / 2, q)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    zero = m == 0
    q = torch.where(zero, torch.zeros_like(q), q)
    exp = torch.where(zero, torch.zeros_like(exp), exp)
    return q.to(torch.int64), exp


def multiplier_value(m0: Tensor, e: Tensor) -> Tensor:
    """The real value ``M0 * 2^(e - 31)`` represented by a quantized multiplier (float64)."""
    return m0.to(torch.float64) * torch.pow(2.0, (e - 31).to(torch.float64))


def saturating_rounding_doubling_high_mul(a: Tensor, b: Tensor) -> Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` on int64 tensors holding int32 values."""
    a = a.to(torch.int64)
    b = torch.as_tensor(b, dtype=torch.int64, device=a.device)
    overflow = (a == INT32_MIN) & (b == INT32_MIN)
    ab = a * b
    nudge = torch.where(ab >= 0, torch.full_like(ab, 1 << 30), torch.full_like(ab, 1 - (1 << 30)))
    res = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    return torch.where(overflow, torch.full_like(res, INT32_MAX), res)


def rounding_divide_by_pot(x: Tensor, exponent: Tensor | int) -> Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``round(x / 2^exponent)``, ties away from zero (exponent >= 0)."""
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    one = torch.ones((), dtype=torch.int64, device=x.device)
    mask = torch.bitwise_left_shift(one, e) - 1
    remainder = torch.bitwise_and(x, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x < 0).to(torch.int64)
    return torch.bitwise_right_shift(x, e) + (remainder > threshold).to(torch.int64)


def multiply_by_quantized_multiplier(x: Tensor, m0: Tensor, e: Tensor) -> Tensor:
    """``round(x * M)`` the TFLite way: left shift for ``e > 0``, high-mul, rounding right shift."""
    e = torch.as_tensor(e, dtype=torch.int64, device=x.device)
    left = torch.clamp(e, min=0)
    right = torch.clamp(-e, min=0)
    x = torch.bitwise_left_shift(x.to(torch.int64), left)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0.to(x.device)), right)


def requantize(acc: Tensor, m0: Tensor, e: Tensor, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(acc * M) + zero_point, qmin, qmax)`` with integer arithmetic only."""
    return torch.clamp(multiply_by_quantized_multiplier(acc, m0, e) + zero_point, qmin, qmax)


# -- int4 storage --------------------------------------------------------------------------------------------
def pack_int4(codes: Tensor | np.ndarray, qmin: int) -> np.ndarray:
    """Pack integer codes in ``[qmin, qmin + 15]`` two per byte (low nibble = even index) as uint8."""
    c = np.asarray(codes.cpu() if isinstance(codes, Tensor) else codes).astype(np.int64).reshape(-1) - qmin
    if c.size and (c.min() < 0 or c.max() > 15):
        raise ValueError(f"codes out of the 4-bit range [{qmin}, {qmin + 15}]: min {c.min() + qmin}, "
                         f"max {c.max() + qmin}")
    if c.size % 2:
        c = np.concatenate([c, np.zeros(1, np.int64)])
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, qmin: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 codes of the given shape."""
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(p.size * 2, dtype=np.int16)
    out[0::2] = p & 0x0F
    out[1::2] = p >> 4
    n = math.prod(shape)
    return (out[:n] + qmin).astype(np.int8).reshape(shape)


__all__ = [
    "multiplier_value",
    "multiply_by_quantized_multiplier",
    "pack_int4",
    "quantize_multiplier",
    "requantize",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
    "unpack_int4",
]

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

**Single-rounding form** (``wide_multipliers`` / ``wide_requantize``, the engine's default): the same int32
multipliers applied to int64 products, with one rounding at the end, as TFLite's 16x8 kernels do with
their int64 ``MultiplyByQuantizedMultiplier``::

    y = RoundingDivideByPOT(sum_i (x_i * K_i) << l_i + offset, n)    K_i = round(M_i 2^n_i) in [2^30, 2^31)

with ``n = max_i n_i`` and ``l_i = n - n_i`` (per channel), lowered only where the int64 sum could reach
2^62. So ``y = round(sum_i x_i M_i + o)`` to the 31-bit precision of every multiplier (ties to even),
and a residual add rounds once instead of once per operand. Unlike gemmlowp, that one rounding takes
ties to even (``rounding_divide_by_pot_even``), as the simulation's ``torch.round``: with power-of-two scales
(QCode, ``pot``) exact ties are common (bias-free convs, residual adds, 2^k-window average pools).

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


def rounding_divide_by_pot_even(x: Tensor, exponent: Tensor | int) -> Tensor:
    """``round(x / 2^exponent)`` with ties to even, as ``torch.round`` (exponent >= 0, exact on int64).

    ``x = f 2^n + r`` with ``f = x >> n`` (floor) and ``0 <= r < 2^n``: round up where ``r > 2^(n-1)``, and
    on an exact tie ``r = 2^(n-1)`` where ``f`` is odd. Negative ``x`` needs nothing special."""
    x = x.to(torch.int64)
    e = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    one = torch.ones((), dtype=torch.int64, device=x.device)
    mask = torch.bitwise_left_shift(one, e) - 1
    remainder = torch.bitwise_and(x, mask)
    floor = torch.bitwise_right_shift(x, e)
    half = torch.bitwise_left_shift(one, torch.clamp(e - 1, min=0))  # n = 0: half = 1 > r = 0, no tie
    up = (remainder > half) | ((remainder == half) & (e > 0) & (torch.bitwise_and(floor, one) == 1))
    return floor + up.to(torch.int64)


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


def wide_multipliers(terms: list[tuple[Tensor, float]], offset: Tensor | None = None,
                     limit: float = 2.0**62) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
    """Int32 multipliers ``K_i``, left shifts ``l_i``, right shift ``n`` and int64 offset such that
    ``RDBPOT(sum_i (x_i K_i) << l_i + offset, n) = round(sum_i x_i M_i + o)`` to 31 bits of each multiplier.

    ``terms`` are ``(M_i, bound_i)``: real multipliers (broadcastable float64 tensors, >= 0) and the largest
    ``|x_i|``; ``offset`` is ``o`` in output units. Per element of the broadcast shape each term gets its own
    exponent ``n_i`` (``K_i = round(M_i 2^n_i) in [2^30, 2^31)``), ``n = max_i n_i`` and ``l_i = n - n_i``;
    where ``sum_i bound_i K_i 2^l_i + |offset| + 2^n`` would reach ``limit``, ``n`` is lowered (and the
    ``n_i`` above it with it) until it fits.
    """
    ms = [torch.as_tensor(m, dtype=torch.float64) for m, _ in terms]
    bounds = [max(float(b), 1.0) for _, b in terms]
    for m in ms:
        if bool((m < 0).any()) or not bool(torch.isfinite(m).all()):
            raise ValueError(f"requantization multipliers must be finite and >= 0, got {m.flatten()[:8].tolist()}")
    shape = torch.broadcast_shapes(*(m.shape for m in ms), *(() if offset is None else (offset.shape,)))
    ms = [m.expand(shape) for m in ms]
    off = torch.zeros(shape, dtype=torch.float64) if offset is None else offset.to(torch.float64).expand(shape)
    own = []
    for m in ms:  # largest exponent with round(m 2^e) < 2^31
        mant, e = torch.frexp(torch.where(m > 0, m, torch.ones_like(m)))
        ni = 31 - e.to(torch.int64) - (torch.round(mant * 2.0**31) >= 2.0**31).to(torch.int64)
        own.append(ni.clamp(min=0, max=62))
    n = torch.stack(own).amax(0)
    for _ in range(64):
        nis = [torch.minimum(ni, n) for ni in own]
        ks = [torch.round(m * torch.pow(2.0, ni.to(torch.float64))) for m, ni in zip(ms, nis)]
        total = sum(b * k * torch.pow(2.0, (n - ni).to(torch.float64)) for b, k, ni in zip(bounds, ks, nis))
        scale = torch.pow(2.0, n.to(torch.float64))
        bad = total + torch.round(off * scale).abs() + scale >= limit
        if not bool(bad.any()):
            break
        if bool((bad & (n == 0)).any()):
            raise ValueError("requantization does not fit in 64 bits: multipliers or operands too large")
        n = torch.where(bad, n - 1, n)
    scale = torch.pow(2.0, n.to(torch.float64))
    return ([k.to(torch.int64) for k in ks], [n - ni for ni in nis], n, torch.round(off * scale).to(torch.int64))


def wide_requantize(xs: list[Tensor], ks: list[Tensor], n: Tensor, offset: Tensor | None = None,
                    lshifts: list[Tensor] | None = None) -> Tensor:
    """``round(sum_i (x_i K_i) << l_i + offset, n) / 2^n)`` on int64: one rounding, ties to even as the
    simulation's ``torch.round`` (:func:`rounding_divide_by_pot_even`)."""
    total = None
    for i, (x, k) in enumerate(zip(xs, ks)):
        t = x.to(torch.int64) * k.to(x.device)
        if lshifts is not None:
            t = torch.bitwise_left_shift(t, lshifts[i].to(x.device))
        total = t if total is None else total + t
    if offset is not None:
        total = total + offset.to(total.device)
    return rounding_divide_by_pot_even(total, n.to(total.device))


def pot_multiplier_even(x: Tensor, m0: Tensor, e: Tensor) -> Tensor:
    """``round(x * M)`` for an exact power-of-two multiplier (``M0 = 2^30``: ``M = 2^(e - 1)``) as one shift,
    ties to even; gemmlowp's MBQM would round twice (high-mul, then shift), each time half away from zero."""
    s = torch.as_tensor(e, dtype=torch.int64, device=x.device) - 1
    x = x.to(torch.int64)
    return torch.where(s >= 0, torch.bitwise_left_shift(x, torch.clamp(s, min=0)),
                       rounding_divide_by_pot_even(x, torch.clamp(-s, min=0)))


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
    "pot_multiplier_even",
    "requantize",
    "rounding_divide_by_pot",
    "rounding_divide_by_pot_even",
    "saturating_rounding_doubling_high_mul",
    "unpack_int4",
    "wide_multipliers",
    "wide_requantize",
]

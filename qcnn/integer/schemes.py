"""Requantization schemes: how an accumulator (or codes on another grid) becomes codes on an output grid.

This module is the one place that knows the two schemes, at compile time (which integer multipliers,
shifts and offsets a ``requant`` / ``add`` op stores) and at run time (how they are applied):

* ``int64`` (default): one rounding of an int64 sum, ``y = RDBPOT(sum_i (x_i K_i) << l_i + offset, n)`` with
  31-bit multipliers ``K_i`` (:func:`~qcnn.integer.requant.wide_multipliers`); the ops carry
  ``"scheme": "int64"``;
* ``int32``: gemmlowp's ``MBQM`` with int32 intermediates, ``F <= 16`` extra fractional bits and one more
  rounding, bit-exact with TFLite's int8 kernels (ops without a ``scheme`` attribute) except on ties: an
  exact power-of-two multiplier (``M0 = 2^30``) is applied as one shift and the final ``F``-bit rounding
  takes ties to even, as the simulation's ``torch.round``.

Every rounding that stands for a ``torch.round`` of the simulation takes ties to even.

The compiler picks a scheme once (:func:`get_scheme`); a kernel or exporter reads it back from an op with
:func:`scheme_of`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcnn.integer.ir import Op, operand_tensors, operand_zero_points
from qcnn.integer.requant import (
    multiply_by_quantized_multiplier,
    pot_multiplier_even,
    quantize_multiplier,
    rounding_divide_by_pot_even,
    wide_multipliers,
    wide_requantize,
)

#: extra fractional bits of the int32 (gemmlowp) scheme's intermediate sums (reduced to avoid overflow)
ADD_FRAC_BITS = 16
#: requantization schemes: ``int64`` one rounding of int64 products (default); ``int32`` gemmlowp's MBQM
REQUANT_SCHEMES = ("int64", "int32")
#: an accumulator folded with an exact real offset keeps ``k`` extra fractional bits such that its
#: magnitude stays below ``2^OFFSET_TOP_BITS`` (so its multiplier keeps 31 bits); ``k`` is capped per scheme
OFFSET_TOP_BITS = 30

#: a requantization plan: (attributes, tensors) to store in the op
Plan = tuple[dict, dict[str, Tensor]]


def _clamp_to_grid(op: Op, y: Tensor) -> Tensor:
    return torch.clamp(y + op.attrs["zero_point"], op.attrs["lo"], op.attrs["hi"])


class RequantScheme:
    """Interface of a scheme. Compile time: ``plan_requant`` / ``plan_add`` give the attributes and tensors of a
    ``requant`` / ``add`` op, ``check_accumulator`` refuses accumulators the scheme cannot take. Run time:
    ``apply`` runs such an op."""

    name: str
    #: at most this many extra fractional bits when an exact offset is folded into an accumulator
    offset_frac_cap: int

    def check_accumulator(self, name: str, bound: float) -> None:
        """Raise ValueError if an accumulator bounded by ``bound`` cannot be requantized."""

    def plan_requant(self, m: Tensor, bound: float, offset: Tensor | None, exact_bias: bool) -> Plan:
        """``round(x m + offset)`` for ``|x| <= bound`` (``offset`` in output units or None; ``exact_bias``: the
        model keeps its biases in output units, ``bias_mode="output"``)."""
        raise NotImplementedError

    def plan_add(self, terms: list[tuple[Tensor, float]], offset: Tensor | None) -> Plan:
        """``round(sum_i x_i m_i + offset)`` for ``terms = [(m_i, bound_i)]``."""
        raise NotImplementedError

    def apply(self, op: Op, xs: list[Tensor]) -> Tensor:
        """Run a ``requant`` / ``add`` op planned by this scheme on its inputs."""
        raise NotImplementedError


class Int64Scheme(RequantScheme):
    """One rounding of int64 products with 31-bit multipliers (the engine's default; any accumulator below
    2^53 fits)."""

    name = "int64"
    offset_frac_cap = 24

    def plan_requant(self, m: Tensor, bound: float, offset: Tensor | None, exact_bias: bool) -> Plan:
        (k,), _, n, o = wide_multipliers([(m, bound)], offset)
        return {"scheme": self.name}, {"multiplier": k, "rshift": n, "offset": o}

    def plan_add(self, terms: list[tuple[Tensor, float]], offset: Tensor | None) -> Plan:
        ks, ls, n, o = wide_multipliers(terms, offset)
        tensors = {}
        for i, (k, sh) in enumerate(zip(ks, ls)):
            tensors[f"multiplier{i}"], tensors[f"lshift{i}"] = k, sh
        tensors.update(rshift=n, offset=o)
        return {"scheme": self.name}, tensors

    def apply(self, op: Op, xs: list[Tensor]) -> Tensor:
        t = op.tensors
        xs = [x - z for x, z in zip(xs, operand_zero_points(op))]
        y = wide_requantize(xs, operand_tensors(op, "multiplier"), t["rshift"], t["offset"],
                            operand_tensors(op, "lshift"))
        return _clamp_to_grid(op, y)


def _frac_bits(terms, cap: int = ADD_FRAC_BITS) -> int:
    """Fractional bits F such that each ``x * 2^left`` of ``MBQM(x, M 2^F)`` stays below 2^31 (int32)."""
    frac = cap
    for m, bound in terms:
        _, e = quantize_multiplier(torch.as_tensor(m, dtype=torch.float64))
        frac = min(frac, int(math.floor(31 - math.log2(max(bound, 1.0)) - 1 - int(e.max()))))
    return max(frac, 0)


class Int32Scheme(RequantScheme):
    """gemmlowp's ``MultiplyByQuantizedMultiplier`` on int32 values (TFLite's int8 kernels)."""

    name = "int32"
    offset_frac_cap = 12

    def check_accumulator(self, name: str, bound: float) -> None:
        if bound >= 2**32:  # x * M0 exact in int64 for |x| < 2^32
            raise ValueError(f"accumulator {name!r} may exceed 32 bits (bound {bound:.3g}); "
                             "use fewer bits or a smaller fan-in")

    def plan_requant(self, m: Tensor, bound: float, offset: Tensor | None, exact_bias: bool) -> Plan:
        """With ``exact_bias`` (bias in output units) ``F`` extra fractional bits and one final rounding."""
        attrs, tensors = {}, {}
        if exact_bias:
            frac = _frac_bits([(m, bound)])
            attrs["frac_bits"] = frac
            off = offset if offset is not None else torch.zeros(m.shape, dtype=torch.float64)
            tensors["offset"] = torch.round(off * 2.0**frac).to(torch.int64)
            m = m * 2.0**frac
        m0, e = quantize_multiplier(m)
        tensors.update(multiplier=m0, shift=e)
        return attrs, tensors

    def plan_add(self, terms: list[tuple[Tensor, float]], offset: Tensor | None) -> Plan:
        """Each operand rescaled with ``F`` fractional bits, summed, rounded once."""
        frac = _frac_bits(terms)
        tensors = {}
        if offset is not None:
            tensors["offset"] = torch.round(offset * 2.0**frac).to(torch.int64)
        for i, (m, _) in enumerate(terms):
            m0, e = quantize_multiplier(m * 2.0**frac)
            tensors[f"multiplier{i}"], tensors[f"shift{i}"] = m0, e
        return {"frac_bits": frac}, tensors

    def apply(self, op: Op, xs: list[Tensor]) -> Tensor:
        t = op.tensors
        total = 0
        for x, z, m0, e in zip(xs, operand_zero_points(op), operand_tensors(op, "multiplier"),
                               operand_tensors(op, "shift")):
            x, m0, e = x - z, m0.to(x.device), e.to(x.device)
            y = multiply_by_quantized_multiplier(x, m0, e)
            pot = m0 == 2**30  # an exact power of two: one shift, ties to even (the simulation's torch.round)
            if bool(pot.any()):
                y = torch.where(pot, pot_multiplier_even(x, m0, e), y)
            total = total + y
        if "offset" in t:
            total = total + t["offset"].to(total.device)
        if "frac_bits" in op.attrs:  # the sum carries F fractional bits: one rounding (ties to even) to the grid
            total = rounding_divide_by_pot_even(total, op.attrs["frac_bits"])
        return _clamp_to_grid(op, total)


SCHEMES: dict[str, RequantScheme] = {"int64": Int64Scheme(), "int32": Int32Scheme()}


def get_scheme(name: str) -> RequantScheme:
    """The scheme called ``name`` (``to_integer(..., requant=name)``)."""
    if name not in SCHEMES:
        raise ValueError(f"requant={name!r} must be one of {REQUANT_SCHEMES}")
    return SCHEMES[name]


def scheme_of(op: Op) -> RequantScheme:
    """The scheme a ``requant`` / ``add`` op was planned with (no ``scheme`` attribute: ``int32``)."""
    return SCHEMES[op.attrs.get("scheme", "int32")]


__all__ = ["ADD_FRAC_BITS", "REQUANT_SCHEMES", "SCHEMES", "Int32Scheme", "Int64Scheme", "RequantScheme", "get_scheme",
           "scheme_of"]

"""Requantization primitives against exact integer / rational references, and int4 packing."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from qcnn.integer.requant import (
    INT32_MAX,
    INT32_MIN,
    multiplier_value,
    multiply_by_quantized_multiplier,
    pack_int4,
    quantize_multiplier,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    unpack_int4,
    wide_multipliers,
    wide_requantize,
)


def _srdhm_ref(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    q = abs(ab + nudge) // (1 << 31)  # C division truncates toward zero
    return q if ab + nudge >= 0 else -q


def _rdbpot_ref(x: int, e: int) -> int:
    mask = (1 << e) - 1
    rem = x & mask
    thr = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if rem > thr else 0)


def _round_half_away(f: Fraction) -> int:
    n = abs(f)
    r = int(n + Fraction(1, 2))
    return r if f >= 0 else -r


def test_quantize_multiplier_matches_exact_value():
    rng = np.random.default_rng(0)
    ms = np.concatenate([rng.uniform(1e-6, 2.0, 500), [0.5, 0.75, 1.0, 1.5, 2.0**-20, 1 - 2.0**-40]])
    m0, e = quantize_multiplier(torch.tensor(ms))
    assert int(m0.min()) >= 2**30 and int(m0.max()) < 2**31
    for m, q, s in zip(ms, m0.tolist(), e.tolist()):
        exact = Fraction(float(m))
        approx = Fraction(q) * Fraction(2) ** (s - 31)
        assert abs(approx - exact) <= Fraction(2) ** (s - 32)  # half a unit of the 31-bit mantissa
    # M = 1 - 2^-40 rounds up to 2^31, which is renormalised to 2^30 with one more exponent step
    assert (m0[-1].item(), e[-1].item()) == (2**30, 1)
    assert multiplier_value(*quantize_multiplier(torch.tensor(0.75))).item() == 0.75
    assert quantize_multiplier(torch.tensor(0.0))[0].item() == 0


def test_quantize_multiplier_rejects_negative():
    with pytest.raises(ValueError, match="multipliers"):
        quantize_multiplier(torch.tensor([-0.5]))


def test_srdhm_and_rdbpot_bit_exact_with_reference():
    rnd = random.Random(1)
    a = [rnd.randint(INT32_MIN, INT32_MAX) for _ in range(400)] + [INT32_MIN, INT32_MAX, 0, -1, 1]
    b = [rnd.randint(INT32_MIN, INT32_MAX) for _ in range(400)] + [INT32_MIN, INT32_MIN, 5, 2**30, -(2**30)]
    got = saturating_rounding_doubling_high_mul(torch.tensor(a), torch.tensor(b)).tolist()
    assert got == [_srdhm_ref(x, y) for x, y in zip(a, b)]
    assert got[-5] == INT32_MAX  # the one saturating case
    xs = [rnd.randint(-(2**31), 2**31 - 1) for _ in range(300)] + [-6, -5, -4, 5, 6, 7, -7]
    es = [rnd.randint(0, 31) for _ in range(300)] + [2, 1, 3, 1, 2, 1, 1]
    got = rounding_divide_by_pot(torch.tensor(xs), torch.tensor(es)).tolist()
    assert got == [_rdbpot_ref(x, e) for x, e in zip(xs, es)]
    # ties go away from zero: -5/2 -> -3, 5/2 -> 3, -6/4 -> -2
    assert rounding_divide_by_pot(torch.tensor([-5, 5, -6]), torch.tensor([1, 1, 2])).tolist() == [-3, 3, -2]


def test_multiply_by_quantized_multiplier_against_exact_rational():
    rng = np.random.default_rng(2)
    xs = rng.integers(-(2**24), 2**24, 2000)
    ms = rng.uniform(1e-4, 0.99, 2000)
    m0, e = quantize_multiplier(torch.tensor(ms))
    got = multiply_by_quantized_multiplier(torch.tensor(xs), m0, e).tolist()
    exact_q = [_round_half_away(Fraction(int(x)) * Fraction(int(q)) / Fraction(2) ** (31 - int(s)))
               for x, q, s in zip(xs, m0.tolist(), e.tolist())]
    ref = [_rdbpot_ref(_srdhm_ref(int(x), q), -s) for x, q, s in zip(xs, m0.tolist(), e.tolist())]
    assert got == ref  # bit-exact with the gemmlowp composition
    diffs = np.abs(np.array(got) - np.array(exact_q))
    assert diffs.max() <= 1  # two roundings (high-mul, then shift) differ from one rounding by at most 1
    no_shift = (e == 0).numpy()
    assert no_shift.any() and (diffs[no_shift] == 0).all()  # one rounding only: exact
    # with F extra fractional bits the first rounding is 2^-F finer: nearly always the exact rounding
    frac = 16
    m0f, ef = quantize_multiplier(torch.tensor(ms) * 2.0**frac)
    small = torch.tensor(xs) // 2**10
    fine = rounding_divide_by_pot(multiply_by_quantized_multiplier(small, m0f, ef), frac).tolist()
    exact_small = [_round_half_away(Fraction(int(x)) * Fraction(float(m))) for x, m in zip(small.tolist(), ms)]
    d2 = np.abs(np.array(fine) - np.array(exact_small))
    assert d2.max() <= 1 and (d2 == 0).mean() > 0.999
    # left shift for multipliers >= 1
    m0, e = quantize_multiplier(torch.tensor(3.0))
    assert multiply_by_quantized_multiplier(torch.tensor([7, -7]), m0, e).tolist() == [21, -21]


def test_int4_pack_roundtrip():
    rng = np.random.default_rng(3)
    for shape, qmin in (((5, 3, 3, 3), -8), ((7,), 0), ((4, 4), -8)):
        codes = rng.integers(qmin, qmin + 16, size=shape)
        packed = pack_int4(codes, qmin)
        assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
        np.testing.assert_array_equal(unpack_int4(packed, qmin, shape), codes)
    assert pack_int4(np.array([-8, 7]), -8).tolist() == [0xF0]
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(np.array([9]), -8)


def _round_away(f: Fraction) -> int:
    """Round half away from zero, exactly."""
    q = (abs(f) + Fraction(1, 2)).__floor__()
    return q if f >= 0 else -q


def _round_even(f: Fraction) -> int:
    """Round half to even, exactly (Python's ``round`` of a Fraction, as ``torch.round``)."""
    return round(f)


@pytest.mark.parametrize("seed", range(3))
def test_wide_requantize_is_one_exact_rounding(seed):
    """One term (a conv requantization) and two terms of very different size (a residual add of an
    accumulator and codes): the int64 form equals round(sum x_i K_i 2^-n_i + offset 2^-n) exactly, each K_i
    is a 31-bit int32 multiplier, and the result is round(sum x_i M_i + o) except within 2^-25 of a tie."""
    g = torch.Generator().manual_seed(seed)
    c = 5
    m_acc = torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64) * 1e-3 + 1e-5
    m_codes = torch.rand((), generator=g, dtype=torch.float64) * 2 + 0.1
    off = (torch.rand(1, c, 1, 1, generator=g, dtype=torch.float64) - 0.5) * 40
    bound_acc, bound_codes = 2**22, 255
    for terms in ([(m_acc, bound_acc)], [(m_acc, bound_acc), (m_codes, bound_codes)]):
        ks, ls, n, o = wide_multipliers(terms, off)
        xs = [torch.randint(-b, b + 1, (64, c, 2, 2), generator=g) for _, b in terms]
        y = wide_requantize(xs, ks, n, o, ls)
        for k in ks:
            assert int(k.max()) < 2**31 and int(k.min()) >= 2**30  # full 31-bit multipliers
        for idx in [(i, ch, 0, 1) for i in range(64) for ch in range(c)]:
            ch = idx[1]
            nn_ = int(n.reshape(-1)[ch])
            exact = sum(Fraction(int(x[idx]) * int(k.reshape(-1)[ch]) * 2 ** int(sh.reshape(-1)[ch]), 2**nn_)
                        for x, k, sh in zip(xs, ks, ls)) + Fraction(int(o.reshape(-1)[ch]), 2**nn_)
            assert int(y[idx]) == _round_even(exact)
            real = sum(Fraction(int(x[idx])) * Fraction(float(m.expand(1, c, 1, 1).reshape(-1)[ch]))
                       for x, (m, _) in zip(xs, terms)) + Fraction(float(off.reshape(-1)[ch]))
            frac = real - real.__floor__()
            if abs(frac - Fraction(1, 2)) > Fraction(1, 2**25):
                assert int(y[idx]) == _round_even(real)


def test_wide_multipliers_lower_the_shift_to_stay_in_64_bits():
    m = torch.tensor([0.75], dtype=torch.float64)
    (k,), _, n, _ = wide_multipliers([(m, 2.0**40)])
    assert float(k) * 2.0**40 + 2.0 ** float(n) < 2.0**62
    assert abs(float(k) / 2.0 ** float(n) - 0.75) < 1e-9
    with pytest.raises(ValueError, match="finite and >= 0"):
        wide_multipliers([(torch.tensor([-1.0]), 10)])

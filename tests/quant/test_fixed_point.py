"""QCode fixed-point quantizer: hand values, gradient, grid properties, fl from range, state round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.quant.fixed_point import FixedPointQuantizer, fl_from_amax, qcode_fl
from qcnn.recipes import Recipe


def test_forward_hand_values():
    q = FixedPointQuantizer(4, fl=2)  # step 0.25, codes [-8, 7] -> [-2.0, 1.75]
    x = torch.tensor([0.1, 0.13, -0.3, 1.8, -5.0, 0.375])
    assert q(x).tolist() == [0.0, 0.25, -0.25, 1.75, -2.0, 0.5]
    q = FixedPointQuantizer(3, fl=-1)  # step 2, codes [-4, 3] -> [-8, 6]
    assert q(torch.tensor([2.9, 7.0, -9.0])).tolist() == [2.0, 6.0, -8.0]
    u = FixedPointQuantizer(3, signed=False, fl=1)  # codes [0, 7] -> [0, 3.5]
    assert u(torch.tensor([-1.0, 1.2, 9.0])).tolist() == [0.0, 1.0, 3.5]
    g = q.grid()
    assert g.bits == 3 and int(g.fl) == -1 and float(g.scale) == 2.0 and (g.qmin, g.qmax) == (-4, 3)


def test_gradient_is_masked_ste():
    q = FixedPointQuantizer(4, fl=2)
    x = torch.tensor([0.1, 1.9, -2.2, -1.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0, 1.0]  # 1.9*4=7.6 -> rounds to 8 > 7 clipped; -2.2*4 < -8


def test_fl_from_range_formula():
    assert qcode_fl(torch.tensor([0.9, -0.5]), 8) == 7  # ceil(log2 0.9) = 0
    assert qcode_fl(torch.tensor([3.0]), 8) == 5  # ceil(log2 3) = 2
    assert qcode_fl(torch.tensor([300.0]), 8) == -2  # ceil(log2 300) = 9
    assert qcode_fl(torch.tensor([3.0]), 8, signed=False) == 6
    assert fl_from_amax(torch.tensor([0.9, 3.0, 300.0]), 8, True).tolist() == [7, 5, -2]
    fl = fl_from_amax(torch.tensor(0.0), 8, True)  # constant zero: finite, clamped, no NaN
    assert fl.dtype == torch.int32 and 0 < int(fl) <= 40


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), fl=st.integers(-3, 8), seed=st.integers(0, 10_000), signed=st.booleans())
def test_outputs_on_grid(bits, fl, seed, signed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, generator=g) * 2.0 ** (bits - 1 - fl) * 0.7
    q = FixedPointQuantizer(bits, signed=signed, fl=fl)
    y = q(x)
    step = 2.0**-fl
    codes = y / step
    assert torch.equal(codes, torch.round(codes))
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    assert torch.unique(y).numel() <= 2**bits
    inside = (x >= q.qmin * step) & (x <= q.qmax * step)
    assert float(torch.cat([(y - x)[inside].abs(), torch.zeros(1)]).max()) <= step / 2 + 1e-6
    assert torch.equal(q(y), y)  # idempotent


def test_calibration_and_constant_input():
    q = FixedPointQuantizer(8, observer="minmax")
    with pytest.raises(RuntimeError, match="before calibration"):
        q(torch.ones(3))
    q = FixedPointQuantizer(8, observer="minmax")
    q.observing = True
    assert torch.equal(q(torch.tensor([0.5, -3.0])), torch.tensor([0.5, -3.0]))  # passes through
    q.observing = False
    q.finish_calibration()
    assert int(q.fl) == 5
    z = FixedPointQuantizer(8, observer="kl")
    z.observing = True
    z(torch.zeros(100))
    z.observing = False
    z.finish_calibration()
    assert torch.isfinite(z(torch.zeros(4))).all() and torch.isfinite(z.grid().scale).all()


def test_weight_init_from_input_and_per_channel():
    w = torch.tensor([[0.5, -0.25], [4.0, 1.0], [0.01, 0.0]])
    q = FixedPointQuantizer(8, per_channel=True, init_from_input=True)
    y = q(w)
    assert q.fl.tolist() == [8, 5, 13]  # max 0.5 -> ceil(log2) = -1 -> fl 8 (0.5 itself clips to 127/256)
    assert torch.all((y - w).abs() <= torch.exp2(-q.fl.float()).unsqueeze(1))  # at most one step (clip)
    assert q.grid().axis == 0


def test_state_dict_round_trip():
    q = FixedPointQuantizer(6, per_channel=True, init_from_input=True)
    q(torch.randn(5, 3) * torch.tensor([[1.0], [10.0], [0.1], [3.0], [100.0]]))
    fresh = FixedPointQuantizer(6, per_channel=True, init_from_input=True)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.fl, q.fl) and fresh.is_initialized()
    x = torch.randn(5, 3)
    assert torch.equal(fresh(x), q(x))


def test_qcode_method_places_quantizers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    qm = quantize(model, Recipe(method="qcode", w_bits=6, a_bits=5, first_last="same", per_channel=False))
    convs = [m for m in qm.modules() if hasattr(m, "weight_quant")]
    assert all(isinstance(m.weight_quant, FixedPointQuantizer) for m in convs)
    assert [m.weight_quant.bits for m in convs] == [6, 6] and [m.input_quant.bits for m in convs] == [5, 5]
    x = torch.randn(8, 3, 8, 8)
    with calibrating(qm):
        qm(x)
    lin = convs[1]
    step = 2.0 ** -int(lin.weight_quant.fl)
    codes = lin.quantized_weight() / step
    assert torch.equal(codes, torch.round(codes))
    with pytest.raises(ValueError, match="weight_calib"):
        quantize(model, Recipe(method="qcode", params={"weight_calib": "nope", "bogus": 1}))
    with pytest.raises(ValueError, match="'nope'"):
        quantize(model, Recipe(method="qcode", params={"weight_calib": "nope"}))


def test_one_bit_signed_qcode_is_refused_and_marked_undefined():
    import pytest

    from qcnn.methods.qcode import QCodeMethod
    from qcnn.quant.fixed_point import FixedPointQuantizer

    with pytest.raises(ValueError, match="bits=1 is not supported by a signed QCode"):
        FixedPointQuantizer(1, signed=True)
    assert FixedPointQuantizer(1, signed=False).qmax == 1  # unsigned 1-bit {0, 1} is a valid grid
    assert "2-16" in QCodeMethod.defines(1, 8)

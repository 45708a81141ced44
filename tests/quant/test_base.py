"""Quantizer contract: bit checks, code ranges, STE helpers, Grid codes round trip."""

from __future__ import annotations

import pytest
import torch

from qcnn.quant.base import Grid, check_bits, qrange, round_ste, sign_ste


@pytest.mark.parametrize("bad", [0, 17, -3, 2.5, "8", True])
def test_check_bits_names_the_value(bad):
    with pytest.raises(ValueError, match=f"w_bits={bad!r}"):
        check_bits(bad, "w_bits")


def test_qrange():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, True, narrow=True) == (-127, 127)
    assert qrange(4, False) == (0, 15)
    assert qrange(1, True) == (-1, 0)


def test_ste_helpers():
    x = torch.tensor([-1.6, -0.2, 0.0, 0.5, 2.4], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 0.0, 2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0] * 5
    x.grad = None
    s = sign_ste(x)
    assert s.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    (s * torch.arange(5.0)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_grid_codes_round_trip():
    g = Grid(bits=4, signed=False, scale=torch.tensor(0.5), zero_point=torch.tensor(3, dtype=torch.int32))
    x = torch.tensor([-1.5, 0.0, 2.0, 6.0, 100.0])
    q = g.to_codes(x)
    assert q.tolist() == [0, 3, 7, 15, 15] and q.dtype == torch.int32
    assert g.from_codes(q).tolist() == [-1.5, 0.0, 2.0, 6.0, 6.0]
    pc = Grid(bits=8, signed=True, scale=torch.tensor([1.0, 0.25]), zero_point=torch.zeros(2, dtype=torch.int32),
              axis=0)
    w = torch.tensor([[3.0, -2.0], [0.5, -0.25]])
    assert torch.equal(pc.from_codes(pc.to_codes(w)), w)
    assert pc.to_codes(w).tolist() == [[3, -2], [2, -1]]
    cb = Grid(bits=2, signed=True, levels=torch.tensor([-1.0, -0.1, 0.1, 1.0]))
    assert not cb.is_uniform
    assert cb.to_codes(torch.tensor([-0.8, 0.05, 2.0])).tolist() == [0, 2, 3]


def test_integer_view_of_odd_code_and_binary_codebooks():
    """DoReFa / PACT weights: levels (2i - n) / n, i.e. the odd codes -n..n with scale 1/n (k + 1 bits to hold);
    binary {-E, E}: codes {-1, 1}; a codebook that is not scale x integers (non-uniform) has no view."""
    from qcnn.quant.dorefa import DoReFaWeight
    from qcnn.quant.nonuniform import QuantileWeightQuantizer

    u = Grid(bits=4, signed=False, scale=torch.tensor(0.5), zero_point=torch.tensor(3, dtype=torch.int32))
    assert u.integer_view() is u
    q = DoReFaWeight(4)
    w = torch.randn(64)
    y = q(w)
    v = q.grid().integer_view()
    assert (v.qmin, v.qmax, v.bits, v.signed) == (-15, 15, 5, True)
    assert float(v.scale) == pytest.approx(1 / 15) and int(v.zero_point) == 0
    c = v.to_codes(y)
    assert set(c.tolist()) <= set(range(-15, 16, 2))  # odd codes only
    assert torch.allclose(v.from_codes(c), y, atol=1e-6)
    binary = Grid(bits=1, signed=True, levels=torch.tensor([-0.3, 0.3]), int_levels=torch.tensor([-1, 1]),
                  scale=torch.tensor(0.3))
    bv = binary.integer_view()
    assert (bv.qmin, bv.qmax, bv.bits) == (-1, 1, 2)
    assert bv.to_codes(torch.tensor([-0.3, 0.3])).tolist() == [-1, 1]
    exact = Grid(bits=2, signed=True, levels=torch.tensor([-1.0, -0.1, 0.1, 1.0]),
                 int_levels=torch.tensor([-10, -1, 1, 10]), scale=torch.tensor(0.1))
    assert exact.integer_view().to_codes(torch.tensor([-1.0, -0.1, 0.1, 1.0])).tolist() == [-10, -1, 1, 10]
    off = Grid(bits=2, signed=True, levels=torch.tensor([-1.0, -0.12, 0.1, 1.0]),
               int_levels=torch.tensor([-10, -1, 1, 10]), scale=torch.tensor(0.1))
    assert off.integer_view() is None  # every level is checked
    nu = QuantileWeightQuantizer(3)
    nu(torch.randn(256))
    g = nu.grid()
    assert g.integer_view() is None or torch.allclose(g.levels.double(), g.int_levels.double() * float(g.scale))


@pytest.mark.parametrize("method", ["uniform", "qcode", "pact", "lsq", "hwgq", "nonuniform"])
def test_torch_export_of_a_calibrated_quantized_model(method):
    """torch.export of a quantized model used to fail on the calibration check (a host read of a buffer:
    a data-dependent guard); the exported program equals the eager model and the check still runs eagerly."""
    from qcnn.calib import calibrating
    from qcnn.methods import quantize
    from qcnn.models import build_model
    from qcnn.recipes import load_recipe

    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    recipe = load_recipe(method).replace(w_bits=4, a_bits=4)
    x = torch.randn(2, 3, 32, 32)
    fresh = quantize(model, recipe).eval()
    with pytest.raises(RuntimeError, match="used before calibration"):
        fresh(x)
    q = quantize(model, recipe)
    with calibrating(q):
        q(x)
    q.eval()
    program = torch.export.export(q, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}})
    y = torch.randn(5, 3, 32, 32)
    assert torch.equal(program.module()(x), q(x))
    assert torch.equal(program.module()(y), q(y))  # dynamic batch
    assert not torch.equal(program.module()(x), model(x))  # quantized, not the float network

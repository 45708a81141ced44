"""Fused quantizer kernels (qcnn.quant.kernels): mode selection, fallback, and the uniform fake-quant kernel
equal to torch's fused kernels bit for bit."""

from __future__ import annotations

import pytest
import torch

from qcnn.calib import calibrating
from qcnn.quant import kernels
from qcnn.quant.uniform import UniformQuantizer, fake_quant
from tests.quant.kernel_check import assert_fused_matches

UNIFORM_KERNELS = ("_fq_forward", "_fq_backward")


def test_mode_from_env_context_and_errors(monkeypatch):
    monkeypatch.delenv("QCNN_KERNELS", raising=False)
    assert kernels.mode() == "eager"
    monkeypatch.setenv("QCNN_KERNELS", "fused")
    assert kernels.mode() == "fused"
    with kernels.use("eager"):
        assert kernels.mode() == "eager"
    assert kernels.mode() == "fused"
    monkeypatch.setenv("QCNN_KERNELS", "turbo")
    with pytest.raises(ValueError, match=r"QCNN_KERNELS.*'turbo'.*eager, fused"):
        kernels.mode()
    with pytest.raises(ValueError, match="kernels='fast'"):
        kernels.set_mode("fast")


def test_trainspec_refuses_an_unknown_kernel_mode():
    from qcnn.recipes import TrainSpec

    assert TrainSpec(kernels="fused").kernels == "fused"
    with pytest.raises(ValueError, match="kernels='cuda'"):
        TrainSpec(kernels="cuda")


@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quant_kernel_equals_torch_fused_kernel(per_channel):
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16) * 3
    scale = torch.rand(64) * 0.05 + 0.01 if per_channel else torch.tensor(0.03)
    zp = torch.randint(-3, 4, (64,), dtype=torch.int32) if per_channel else torch.tensor(2, dtype=torch.int32)
    axis = 1 if per_channel else None
    ref = (torch.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127) if per_channel
           else torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), -128, 127))
    with kernels.use("fused"):
        y = fake_quant(x, scale, zp, -128, 127, axis)
    assert kernels.fused_calls().get("_fq_forward", 0) > 0
    assert torch.equal(y, ref)


@pytest.mark.parametrize("kind", ["weight_per_channel", "weight_pot", "act_tracked"])
def test_uniform_quantizer_fused_matches_eager(kind):
    torch.manual_seed(1)
    if kind == "act_tracked":
        q = UniformQuantizer(4, signed=False, symmetric=False, track_in_training=True)
        x = torch.randn(4, 16, 16, 16).relu() * 2
        with calibrating(q):
            q(x * 0.8)
        q.train()
    else:
        q = UniformQuantizer(4, signed=True, per_channel=kind == "weight_per_channel", dynamic=True,
                             pot=kind == "weight_pot")
        x = torch.randn(64, 32, 3, 3) * 0.1
    assert_fused_matches(q, x, kernel_names=UNIFORM_KERNELS)


def test_small_tensors_and_tracing_stay_eager():
    before = dict(kernels.fused_calls())
    x = torch.randn(100)
    with kernels.use("fused"):
        assert not kernels.fused_for(x)
        fake_quant(x, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -8, 7, None)
        assert not kernels.fused_for(torch.arange(kernels.MIN_NUMEL))  # integer tensors are never fused
    assert kernels.fused_calls() == before


def test_a_kernel_that_does_not_compile_runs_eagerly_with_one_warning(monkeypatch):
    def broken(fn):
        def run(*args):
            raise RuntimeError("no C++ compiler found")
        return run

    def double(x, k: float):
        return x * k

    monkeypatch.setattr(kernels, "_compile", broken)
    x = torch.randn(kernels.MIN_NUMEL)
    try:
        with kernels.use("fused"), pytest.warns(RuntimeWarning, match="double could not be compiled.*no C"):
            y = kernels.call(double, x, 2.0)
        assert torch.equal(y, x * 2.0)
        assert "no C++ compiler" in kernels.failures()[double.__qualname__]
        with kernels.use("fused"):  # known to fail: eager again, no second warning
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert torch.equal(kernels.call(double, x, 3.0), x * 3.0)
    finally:
        kernels._failed.pop(double, None)
        kernels._compiled.pop(double, None)

"""DoReFa-Net quantizers: exact grids, straight-through gradients, the gradient quantizer's noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.nn.layers import QConv2d
from qcnn.quant.dorefa import DoReFaActivation, DoReFaGradQuantizer, DoReFaWeight, quantize_k
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe


def test_quantize_k_values_and_ste():
    x = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], requires_grad=True)
    y = quantize_k(x, 2)  # round(3x)/3: 0, 0.3->0, 1.5->2, 2.7->3, 3
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 2 / 3, 1.0, 1.0]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_activation_forward_grid_and_masked_backward():
    x = torch.tensor([-0.5, 0.2, 0.4, 0.9, 1.0, 1.7], requires_grad=True)
    q = DoReFaActivation(2)
    y = q(x)
    # clip -> [0, .2, .4, .9, 1, 1]; *3 -> [0, .6, 1.2, 2.7, 3, 3]; round -> [0, 1, 1, 3, 3, 3]
    assert torch.allclose(y, torch.tensor([0, 1, 1, 3, 3, 3]) / 3)
    y.backward(torch.arange(1.0, 7.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))
    g = q.grid()
    assert (g.qmin, g.qmax, g.signed) == (0, 3, False) and math.isclose(float(g.scale), 1 / 3, rel_tol=1e-6)


def test_activation_levels_count():
    x = torch.randn(10000) * 2
    for k in (1, 2, 3, 4):
        y = DoReFaActivation(k)(x)
        assert y.unique().numel() == 2**k
        assert torch.allclose(y * (2**k - 1), torch.round(y * (2**k - 1)), atol=1e-5)


def test_signed_activation_variant():
    x = torch.tensor([-1.4, -0.5, -0.1, 0.3, 2.0], requires_grad=True)
    y = DoReFaActivation(3, signed=True)(x)  # n = 3 on [-1, 1]
    assert torch.allclose(y, torch.tensor([-3.0, -2.0, 0.0, 1.0, 3.0]) / 3)  # round(-1.5) = -2 (half to even)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def test_weight_one_bit_sign_times_mean_identity_grad():
    w = torch.tensor([[-0.3, 0.1], [0.2, -0.0]], requires_grad=True)
    q = DoReFaWeight(1)
    y = q(w)
    e = 0.15  # mean |w| = 0.6 / 4
    assert torch.allclose(y, torch.tensor([[-e, e], [e, e]]))
    gout = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    y.backward(gout)
    assert torch.equal(w.grad, gout)
    assert torch.allclose(q.grid().levels, torch.tensor([-e, e]))


def test_weight_tanh_form_grid_and_gradient():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    q = DoReFaWeight(2)
    y = q(w)
    t = torch.tanh(w.detach())
    r = t / (2 * t.abs().max()) + 0.5
    assert torch.allclose(y, 2 * torch.round(3 * r) / 3 - 1)
    assert {round(v * 3) for v in y.detach().unique().tolist()} == {-3, -1, 1, 3}
    gout = torch.randn_like(w)
    y.backward(gout)
    # straight through the rounding: gradient of 2 r - 1 = tanh(w) / max|tanh(w)|
    w2 = w.detach().clone().requires_grad_(True)
    t2 = torch.tanh(w2)
    (t2 / t2.abs().max()).backward(gout)
    assert torch.allclose(w.grad, w2.grad, atol=1e-6)
    assert torch.allclose(q.grid().levels, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert torch.equal(q.grid().int_levels, torch.tensor([-3, -1, 1, 3]))


def test_constant_weight_no_nan():
    for k in (1, 2, 4):
        y = DoReFaWeight(k)(torch.zeros(4, 4))
        assert torch.isfinite(y).all()


def _grad_q(bits, g, seed):
    gen = torch.Generator().manual_seed(seed)
    q = DoReFaGradQuantizer(bits, generator=gen)
    x = torch.zeros_like(g, requires_grad=True)
    q(x).backward(g)
    return x.grad


def test_gradient_quantizer_matches_formula_with_seeded_noise():
    torch.manual_seed(1)
    g = torch.randn(4, 3, 5)
    bits, n = 4, 15
    out = _grad_q(bits, g, seed=123)
    u = torch.rand(g.shape, generator=torch.Generator().manual_seed(123))
    m = g.abs().amax(dim=(1, 2), keepdim=True)
    gp = g / (2 * m) + 0.5 + (u - 0.5) / n
    ref = 2 * m * (torch.round(gp.clamp(0, 1) * n) / n - 0.5)
    assert torch.allclose(out, ref, atol=1e-6)
    # on the per-sample grid 2m(i/n - 1/2), within one step of g, reproducible with the same seed
    codes = (out / (2 * m) + 0.5) * n
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert ((out - g).abs() <= 2 * m / n + 1e-6).all()
    assert torch.equal(out, _grad_q(bits, g, seed=123))
    assert not torch.equal(out, _grad_q(bits, g, seed=124))


def test_gradient_quantizer_noise_statistics_and_unbiasedness():
    gen = torch.Generator().manual_seed(0)
    q = DoReFaGradQuantizer(2, generator=gen)  # n = 3
    noise = q.noise(torch.empty(200_000))
    assert noise.min() >= -1 / 6 and noise.max() <= 1 / 6
    assert abs(float(noise.mean())) < 2e-3
    assert math.isclose(float(noise.var()), (1 / 3) ** 2 / 12, rel_tol=0.02)  # U of width 1/n
    # dithered rounding is unbiased: averaging many quantized copies recovers g
    g = torch.tensor([[1.0, -0.3, 0.55, 0.1]]).repeat(50_000, 1)
    out = _grad_q(2, g, seed=5)
    assert torch.allclose(out.mean(0), g[0], atol=0.01)
    assert out.unique().numel() <= 4


def test_gradient_quantizer_zero_gradient_gives_zero():
    out = _grad_q(3, torch.zeros(2, 8), seed=0)
    assert torch.equal(out, torch.zeros(2, 8))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def test_method_placement_and_state_dict_round_trip():
    torch.manual_seed(0)
    recipe = Recipe(method="dorefa", w_bits=2, a_bits=3, g_bits=6, first_last="8bit")
    q = quantize(_Net(), recipe)
    x = torch.randn(8, 1, 6, 6)
    with calibrating(q):
        q(x)
    assert isinstance(q.conv1.weight_quant, UniformQuantizer) and isinstance(q.fc.input_quant, UniformQuantizer)
    assert isinstance(q.conv2.weight_quant, DoReFaWeight) and isinstance(q.conv2.input_quant, DoReFaActivation)
    assert isinstance(q.conv2.out_quant, DoReFaGradQuantizer) and q.conv1.out_quant is None
    assert q.conv2.input_quant.bits == 3 and q.conv2.out_quant.bits == 6
    q.eval()
    ref = q(x)
    q2 = quantize(_Net(), recipe)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2.eval()(x), ref)


def test_gradient_quantizer_acts_on_layer_output_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    gen = torch.Generator().manual_seed(7)
    qc = QConv2d.from_float(conv, out_quant=DoReFaGradQuantizer(2, generator=gen))
    x = torch.randn(2, 2, 5, 5)
    gout = torch.randn(2, 3, 5, 5)
    qc(x).backward(gout)
    gq = DoReFaGradQuantizer(2, generator=torch.Generator().manual_seed(7)).quantize_grad(gout)
    w = conv.weight.detach().clone().requires_grad_(True)
    F.conv2d(x, w, conv.bias.detach(), padding=1).backward(gq)
    assert torch.allclose(qc.weight.grad, w.grad, atol=1e-5)


def test_weight_rescale_keeps_the_layer_scale():
    torch.manual_seed(0)
    w = 0.05 * torch.randn(8, 4, 3, 3)
    plain, scaled = DoReFaWeight(4)(w), DoReFaWeight(4, rescale=True)
    y = scaled(w)
    assert torch.allclose(y, plain * w.abs().max())
    g = scaled.grid()
    assert torch.allclose(g.scale, w.abs().max() / 15) and torch.allclose(g.from_codes(g.to_codes(y)), y, atol=1e-6)


def _assert_fused_close(q, x, kernel_names=(), exact=("y", "dx"), rtol=1e-5):
    """The fused path of ``q`` against its eager path: the parts in ``exact`` (``"y"``, ``"dx"``) bit for bit, the
    others to float rounding (a float32 sum in the compiled kernel's order, torch's ``tanh`` backward); the named
    kernels ran compiled and none fell back."""
    from qcnn.quant import kernels
    from tests.quant.kernel_check import run

    g = torch.randn_like(x)
    before = kernels.fused_calls()
    eager, fused = run(q, x, g, "eager"), run(q, x, g, "fused")
    assert not kernels.failures(), kernels.failures()
    after = kernels.fused_calls()
    for name in kernel_names:
        assert after.get(name, 0) > before.get(name, 0), f"kernel {name} did not run compiled: {after}"
    for what, e, f in zip(("y", "dx"), eager[:2], fused[:2]):
        if what in exact:
            assert torch.equal(e, f), f"{what} differs: max {(e - f).abs().max().item()}"
        else:
            torch.testing.assert_close(f, e, rtol=rtol, atol=1e-6 * e.abs().max().item())


def test_fused_kernels_match_eager():
    """Fused kernels of the activation (unsigned, signed, signed 1-bit) and weight quantizers (tanh form, rescaled,
    1-bit) against the eager path: bit for bit except where a float32 sum (the 1-bit ``E``, the max's gradient) or
    torch's ``tanh`` backward enters, there to float rounding."""
    from qcnn.quant import kernels
    from tests.quant.kernel_check import assert_fused_matches

    torch.manual_seed(0)
    a = torch.randn(4, 16, 16, 16) * 0.6
    w = torch.randn(64, 32, 3, 3) * 0.05
    clip = ("_clip_quant_forward", "_clip_quant_backward")
    assert_fused_matches(DoReFaActivation(4), a, kernel_names=clip)
    assert_fused_matches(DoReFaActivation(3, signed=True), a, kernel_names=clip)
    assert_fused_matches(DoReFaActivation(1, signed=True), a,
                         kernel_names=("binary_sign", "_sign_backward[_inside_unit]"))
    tanh = ("_tanh_quant_forward", "_tanh_quant_backward")
    _assert_fused_close(DoReFaWeight(4), w, kernel_names=tanh, exact=("y",))
    _assert_fused_close(DoReFaWeight(2, rescale=True), w, exact=("y",),
                        kernel_names=("_tanh_quant_rescale_forward", "_tanh_quant_backward"))
    w1 = w.clone()
    w1[0, 0, 0, 0] = w1.abs().max() * 2  # a tie-free max; and ties of the max share its gradient evenly:
    w2 = w.clone()
    w2[:2, 0, 0, 0] = w.abs().max() * 2
    for v in (w1, w2):
        _assert_fused_close(DoReFaWeight(4), v, kernel_names=tanh, exact=("y",))
    q1 = DoReFaWeight(1)
    _assert_fused_close(q1, w, kernel_names=("_mean_sign_forward",), exact=("dx",))
    with kernels.use("fused"):  # the fused E: the same float32 mean up to the order of its sum
        q1(w)
    torch.testing.assert_close(q1.scale, w.abs().mean(), rtol=1e-6, atol=0)


def test_eager_weight_keeps_the_plain_autograd_numerics():
    """Regression: the eager kernels give exactly the values of the plain formulation (float32 ``E = mean|w|``,
    autograd through ``tanh`` and the max) that the benchmarks and checkpoints were made with."""
    torch.manual_seed(5)  # a layer whose float32 and float64 mean|w| differ
    w = torch.randn(256, 128, 3, 3) * 0.05
    assert not torch.equal(w.abs().mean(), w.abs().mean(dtype=torch.float64).float())
    q1 = DoReFaWeight(1)
    wg = w.clone().requires_grad_(True)
    y = q1(wg)
    e = w.abs().mean()
    assert torch.equal(q1.scale, e) and torch.equal(y, w + (torch.where(w >= 0, e, -e) - w))
    g = torch.randn_like(w)
    y.backward(g)
    assert torch.equal(wg.grad, g)
    w.view(-1)[:2] = w.abs().max() * 2  # a tied max
    for rescale in (False, True):
        ref = w.clone().requires_grad_(True)
        t = torch.tanh(ref)
        wq = 2 * quantize_k(t / (2 * t.abs().max().clamp_min(1e-8)) + 0.5, 4) - 1
        wq = wq * w.abs().max() if rescale else wq
        wq.backward(g)
        wg = w.clone().requires_grad_(True)
        y = DoReFaWeight(4, rescale=rescale)(wg)
        y.backward(g)
        assert torch.equal(y, wq.detach()) and torch.equal(wg.grad, ref.grad)


def test_fused_gradient_quantizer_matches_eager_with_the_same_noise():
    from tests.quant.kernel_check import assert_fused_matches

    gen = torch.Generator().manual_seed(0)
    q = DoReFaGradQuantizer(4, generator=gen)

    class Reseeded(nn.Module):  # the same noise stream in both runs
        def forward(self, x):
            gen.manual_seed(3)
            return q(x)

    torch.manual_seed(0)
    x = torch.randn(4, 16, 16, 16)
    g = torch.randn_like(x) * torch.rand(4, 1, 1, 1)
    assert_fused_matches(Reseeded(), x, g, kernel_names=("_grad_quant",))
    gen.manual_seed(3)
    u = torch.rand(x.shape, generator=gen)
    m = g.abs().amax(dim=(1, 2, 3), keepdim=True)
    expect = 2 * m * (torch.round((g / (2 * m) + 0.5 + (u - 0.5) / 15).clamp(0, 1) * 15) / 15 - 0.5)
    xg = x.clone().requires_grad_(True)
    Reseeded()(xg).backward(g)
    assert torch.equal(xg.grad, expect)

"""DoReFa-Net: low bit-width weights, activations and gradients (Zhou et al., arXiv 1606.06160).

``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` for ``r`` in [0, 1]; backward: straight through
(``d quantize_k(r) / dr = 1``).

Weights, k > 1 (:class:`DoReFaWeight`)
    Forward   ``t = tanh(w);  w_q = 2 quantize_k(t / (2 max|t|) + 1/2) - 1``  (max over the whole layer)
    Backward  straight through ``quantize_k`` only; the gradient flows through ``tanh`` and the max as
              ordinary functions (the reference implementation does the same).
    ``rescale=True`` (option ``weight_rescale``, a fine-tuning aid, not in the paper) multiplies ``w_q`` by
    the constant ``max|w|`` of the layer: a following BatchNorm makes the two forms equivalent in training,
    but only the rescaled one keeps a float checkpoint's BatchNorm running statistics (and hence
    calibration and evaluation) valid, since ``w_q`` alone is about ``w / max|w|``. Grid: the ``2^k`` values
              ``(2i - n) / n``, ``n = 2^k - 1``, i.e. odd integers ``-n..n`` times ``1/n``.
Weights, k = 1
    Forward   ``E = mean|w|`` (a constant for autograd);  ``w_q = sign(w) E`` with ``sign(0) = +1``
    Backward  ``dL/dw = dL/dw_q`` (identity: ``d sign(w/E) E / dw`` with the sign passed straight through)
Activations (:class:`DoReFaActivation`)
    Forward   ``a_q = quantize_k(clip(a, 0, 1))``
    Backward  ``da_q/da = 1`` for ``0 <= a <= 1``, else 0
    Signed inputs (no ReLU in front, not covered by the paper): ``clip(a, -1, 1)`` on the symmetric grid
    ``round((2^(k-1) - 1) a) / (2^(k-1) - 1)`` (1 bit: ``sign``), same masked backward on ``[-1, 1]``.
Gradients, k_G bits (:class:`DoReFaGradQuantizer`, identity forward, applied to the gradient arriving at
each conv/linear output)
    ``m = max|g|`` per sample (over all but the batch dimension), ``n = 2^k_G - 1``,
    ``g' = g / (2m) + 1/2 + N``, ``N ~ U(-1/(2n), 1/(2n))`` (half a step of dither, so the rounding is
    unbiased), ``g_q = 2m (quantize_k(clip(g', 0, 1)) - 1/2)``. A sample with ``m = 0`` gets ``g_q = 0``.

Kernels: every quantizer here runs its forward and backward as pure functions through :mod:`qcnn.quant.kernels`
(compiled into fused kernels when fused kernels are on, op by op otherwise). The eager path runs exactly the ops of
the plain autograd formulation (float32 sums, torch's ``tanh`` backward), so its values do not depend on the kernel
machinery. The fused kernels give the same values except where a float32 sum enters the result: the 1-bit ``E`` (and
so the 1-bit output), and the max's gradient in the tanh form (a sum over the layer), which the compiled kernel
reduces in another order; and ``tanh``'s backward, whose compiled form may round differently. There the fused
values differ from the eager ones by float rounding: an ulp elementwise, and the max element's own gradient (which
carries the layer-wide sum) by that sum's rounding (measured up to ~1e-5 relative for a 300k-weight layer).
``tanh`` itself runs eagerly (the compiled ``tanh`` differs from torch's in the last bit).

First / last layers at 8 bits (``first_last: 8bit``): the paper keeps them in float; here they take the
uniform int8 grid of the base :class:`~qcnn.methods.base.Method` (symmetric per-channel weights,
calibrated activations), the grid integer deployments use (:class:`EdgeUniformMethod`). With
``first_last: same`` they get the DoReFa quantizers like every other layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.quant import kernels
from qcnn.quant.base import (
    GradientQuantizer,
    Grid,
    Quantizer,
    ScaleBufferMixin,
    binary_sign,
    round_ste,
    sign_with_grad,
)

EPS = 1e-8


def quantize_k(x: Tensor, bits: int) -> Tensor:
    """``round((2^k - 1) x) / (2^k - 1)`` with a straight-through gradient (DoReFa eq. 5)."""
    n = 2**bits - 1
    return round_ste(x * n) / n


def _clip_quant_forward(x: Tensor, n: int, lo: float) -> Tensor:
    """``round(n clip(x, lo, 1)) / n``: the fused activation kernel."""
    return torch.round(x.clamp(lo, 1.0) * n) / n


def _clip_quant_backward(g: Tensor, x: Tensor, lo: float) -> Tensor:
    """``g [lo <= x <= 1]``, the mask recomputed from ``x``."""
    return g * ((x >= lo) & (x <= 1.0)).to(g.dtype)


class _ClipQuantFn(torch.autograd.Function):
    """``round(n clip(x, lo, 1)) / n`` forward, gradient masked to ``lo <= x <= 1`` (:mod:`qcnn.quant.kernels`)."""

    @staticmethod
    def forward(ctx, x, n: int, lo: float):
        ctx.save_for_backward(x)
        ctx.lo = lo
        return kernels.call(_clip_quant_forward, x, n, lo)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return kernels.call(_clip_quant_backward, g.contiguous(), x, ctx.lo), None, None


def _inside_unit(x: Tensor) -> Tensor:
    """The straight-through mask ``|x| <= 1`` of the signed 1-bit clip."""
    return x.abs() <= 1.0


def clip_quantize(x: Tensor, bits: int, signed: bool) -> Tensor:
    """``quantize_k(clip(x, 0, 1))`` (unsigned) or its symmetric signed counterpart on ``[-1, 1]``."""
    if not signed:
        return _ClipQuantFn.apply(x, 2**bits - 1, 0.0)
    if bits == 1:
        return sign_with_grad(x, _inside_unit)
    return _ClipQuantFn.apply(x, 2 ** (bits - 1) - 1, -1.0)


def clip_grid(bits: int, signed: bool) -> Grid:
    """Grid of :func:`clip_quantize`: step ``1/n`` on ``[0, 1]`` or ``[-1, 1]``."""
    if signed and bits == 1:
        return Grid(bits=1, signed=True, levels=torch.tensor([-1.0, 1.0]), int_levels=torch.tensor([-1, 1]),
                    scale=torch.tensor(1.0))
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    qmin = -n if signed else 0
    return Grid(bits=bits, signed=signed, scale=torch.tensor(1.0 / n), zero_point=torch.tensor(0, dtype=torch.int32),
                qmin=qmin, qmax=n)


class DoReFaActivation(Quantizer):
    """``quantize_k(clip(a, 0, 1))`` (see module docstring); ``signed=True`` for inputs without ReLU."""

    def __init__(self, bits: int, signed: bool = False):
        super().__init__(bits, signed)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            return x
        return clip_quantize(x, self.bits, self.signed)

    def grid(self) -> Grid:
        return clip_grid(self.bits, self.signed)


def _mean_sign_forward(w: Tensor) -> tuple[Tensor, Tensor]:
    """(``w + (sign(w) E - w)``, ``E``) with ``E = mean|w|`` (float32, as the eager ``w.abs().mean()``; the compiled
    kernel's sum runs in another order, so its ``E`` may differ by rounding): the 1-bit weight kernel, reduction
    included."""
    e = w.abs().mean()
    return w + (binary_sign(w) * e - w), e


class _IdentityGradFn(torch.autograd.Function):
    """``fn(w, *args) -> (w_q, scale)`` through :mod:`qcnn.quant.kernels`, identity backward (``dL/dw = dL/dw_q``,
    the straight-through sign of the binary weight quantizers); ``scale`` is not differentiable."""

    @staticmethod
    def forward(ctx, w, fn, *args):
        y, s = kernels.call(fn, w, *args)
        ctx.mark_non_differentiable(s)
        ctx.n_args = len(args)
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        return (g, None) + (None,) * ctx.n_args


def _tanh_quant(t: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(``2 quantize_k(t / (2 max|t|) + 1/2) - 1``, ``max|t|``) in the ops of :func:`quantize_k` (straight-through
    rounding ``u + (round(u) - u)``)."""
    mx = t.abs().max()
    r = t / (2 * mx.clamp_min(EPS)) + 0.5
    u = r * n
    return 2 * ((u + (torch.round(u) - u)) / n) - 1, mx


def _tanh_quant_forward(t: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The k-bit weight kernel on ``t = tanh(w)``, the max reduction included: (``w_q``, ``max|t|``)."""
    return _tanh_quant(t, n)


def _tanh_quant_rescale_forward(t: Tensor, w: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rescaled k-bit weight kernel: (``w_q max|w|``, ``max|t|``, ``max|w|``)."""
    wq, mx = _tanh_quant(t, n)
    m = w.abs().max()
    return wq * m, mx, m


def _tanh_quant_backward(g: Tensor, t: Tensor, mx: Tensor, m: Tensor | None, n: int) -> Tensor:
    """``dL/dw`` of the k-bit weight from ``t = tanh(w)``: straight through the rounding, through ``tanh`` and the
    max as ordinary functions, in autograd's own ops and order (eagerly the exact values of autograd on the plain
    formulation): the divisor's gradient reduced by ``sum_to_size`` (float32, as autograd reduces a broadcast
    gradient), the max's gradient shared evenly among ties, ``tanh``'s backward by ``aten.tanh_backward``. The
    compiled kernel may round the float32 sum (the max element's gradient) and ``tanh_backward`` (an ulp)
    differently."""
    gq = (g * m if m is not None else g) * 2
    gr = (gq / n) * n
    d = 2 * mx.clamp_min(EPS)
    gt = gr / d
    gd = (-gr * ((t / d) / d)).sum_to_size(d.shape)
    gmx = torch.where(mx >= EPS, gd * 2, torch.zeros_like(gd))
    at = t.abs()
    tie = at == mx
    gat = torch.where(tie, gmx / tie.sum(), torch.zeros_like(at))
    return torch.ops.aten.tanh_backward(gt + gat * t.sgn(), t)


class _TanhQuantFn(torch.autograd.Function):
    """DoReFa's k-bit weight through :mod:`qcnn.quant.kernels`: ``tanh`` eagerly (the compiled ``tanh`` differs from
    torch's in the last bit), the rest one kernel each way with its reductions; saves ``t = tanh(w)``. Eagerly the
    values of autograd on ``2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` (times ``max|w|`` rescaled)."""

    @staticmethod
    def forward(ctx, w, n: int, rescale: bool):
        ctx.n = n
        t = torch.tanh(w)
        if not rescale:
            y, mx = kernels.call(_tanh_quant_forward, t, n)
            ctx.save_for_backward(t, mx)
            return y
        y, mx, m = kernels.call(_tanh_quant_rescale_forward, t, w, n)
        ctx.mark_non_differentiable(m)
        ctx.save_for_backward(t, mx, m)
        return y, m

    @staticmethod
    def backward(ctx, g, *_):
        t, mx, *m = ctx.saved_tensors
        return kernels.call(_tanh_quant_backward, g.contiguous(), t, mx, m[0] if m else None, ctx.n), None, None


class DoReFaWeight(ScaleBufferMixin, Quantizer):
    """DoReFa weight quantizer: tanh form for k > 1, ``sign(w) mean|w|`` for k = 1.

    The 1-bit scale ``E`` of the last forward is kept in the buffer ``scale`` for :meth:`grid`.
    """

    def __init__(self, bits: int, rescale: bool = False):
        super().__init__(bits, signed=True)
        self.rescale = rescale
        self.register_buffer("scale", torch.ones(()))

    def forward(self, w: Tensor) -> Tensor:
        if self.bits == 1:
            y, self.scale = _IdentityGradFn.apply(w, _mean_sign_forward)
            return y
        if not self.rescale:
            return _TanhQuantFn.apply(w, 2**self.bits - 1, False)
        y, self.scale = _TanhQuantFn.apply(w, 2**self.bits - 1, True)
        return y

    def grid(self) -> Grid:
        if self.bits == 1:
            return Grid(bits=1, signed=True, levels=torch.stack([-self.scale, self.scale]).detach().clone(),
                        int_levels=torch.tensor([-1, 1]), scale=self.scale.detach().clone())
        n = 2**self.bits - 1
        ints = torch.arange(-n, n + 1, 2)
        m = self.scale.detach().clone() if self.rescale else torch.tensor(1.0)
        return Grid(bits=self.bits, signed=True, levels=ints.float() * m / n, int_levels=ints, scale=m / n)


class DoReFaGradQuantizer(GradientQuantizer):
    """Identity forward; backward quantizes the incoming gradient to ``bits`` bits with DoReFa's
    per-sample scaling and uniform dither (module docstring). ``generator`` makes the noise reproducible."""

    def __init__(self, bits: int, generator: torch.Generator | None = None):
        super().__init__(bits)
        self.generator = generator

    def _uniform(self, g: Tensor) -> Tensor:
        """``U(0, 1)`` of ``g``'s shape, drawn eagerly (the same random stream in both kernel modes)."""
        if self.generator is None:
            return torch.rand(g.shape, device=g.device, dtype=g.dtype)
        return torch.rand(g.shape, generator=self.generator, device=self.generator.device).to(g.device, g.dtype)

    def noise(self, g: Tensor) -> Tensor:
        """``U(-1/(2n), 1/(2n))`` of ``g``'s shape."""
        return _dither(self._uniform(g), 2**self.bits - 1)

    def quantize_grad(self, g: Tensor) -> Tensor:
        return kernels.call(_grad_quant, g.contiguous(), self._uniform(g), 2**self.bits - 1)


def _dither(u: Tensor, n: int) -> Tensor:
    """``(u - 1/2) / n``: half a step of uniform dither from ``u ~ U(0, 1)``."""
    return (u - 0.5) / n


def _grad_quant(g: Tensor, u: Tensor, n: int) -> Tensor:
    """DoReFa's gradient quantizer with the noise ``u ~ U(0, 1)`` given (module docstring): the per-sample max,
    the dither and the rounding in one kernel."""
    dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
    m = g.abs().amax(dim=dims, keepdim=True) if dims else g.abs().amax()
    gp = g / (2 * m.clamp_min(torch.finfo(g.dtype).tiny)) + 0.5 + _dither(u, n)
    q = torch.round(gp.clamp(0.0, 1.0) * n) / n
    return 2 * m * (q - 0.5)


__all__ = ["DoReFaActivation", "DoReFaGradQuantizer", "DoReFaWeight", "binary_sign", "clip_grid", "clip_quantize",
           "quantize_k"]

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

First / last layers at 8 bits (``first_last: 8bit``): the paper keeps them in float; here they take the
uniform int8 grid of the base :class:`~qcnn.methods.base.Method` (symmetric per-channel weights,
calibrated activations), the grid integer deployments use (:class:`EdgeUniformMethod`). With
``first_last: same`` they get the DoReFa quantizers like every other layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.quant.base import GradientQuantizer, Grid, Quantizer, ScaleBufferMixin, binary_sign, round_ste, sign_with_grad

EPS = 1e-8


def quantize_k(x: Tensor, bits: int) -> Tensor:
    """``round((2^k - 1) x) / (2^k - 1)`` with a straight-through gradient (DoReFa eq. 5)."""
    n = 2**bits - 1
    return round_ste(x * n) / n


class _ClipQuantFn(torch.autograd.Function):
    """``round(n clip(x, lo, 1)) / n`` forward, gradient masked to ``lo <= x <= 1``."""

    @staticmethod
    def forward(ctx, x, n: int, lo: float):
        ctx.save_for_backward(x)
        ctx.lo = lo
        return torch.round(x.clamp(lo, 1.0) * n) / n

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * ((x >= ctx.lo) & (x <= 1.0)).to(g.dtype), None, None


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
            e = w.detach().abs().mean()
            self.scale = e
            return w + (binary_sign(w) * e - w).detach()
        t = torch.tanh(w)
        r = t / (2 * t.abs().max().clamp_min(EPS)) + 0.5
        wq = 2 * quantize_k(r, self.bits) - 1
        if not self.rescale:
            return wq
        m = w.detach().abs().max()
        self.scale = m
        return wq * m

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

    def noise(self, g: Tensor) -> Tensor:
        """``U(-1/(2n), 1/(2n))`` of ``g``'s shape."""
        n = 2**self.bits - 1
        if self.generator is None:
            u = torch.rand(g.shape, device=g.device, dtype=g.dtype)
        else:
            u = torch.rand(g.shape, generator=self.generator, device=self.generator.device).to(g.device, g.dtype)
        return (u - 0.5) / n

    def quantize_grad(self, g: Tensor) -> Tensor:
        n = 2**self.bits - 1
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        m = g.abs().amax(dim=dims, keepdim=True) if dims else g.abs().amax()
        gp = g / (2 * m.clamp_min(torch.finfo(g.dtype).tiny)) + 0.5 + self.noise(g)
        q = torch.round(gp.clamp(0.0, 1.0) * n) / n
        return 2 * m * (q - 0.5)


__all__ = ["DoReFaActivation", "DoReFaGradQuantizer", "DoReFaWeight", "binary_sign", "clip_grid", "clip_quantize",
           "quantize_k"]

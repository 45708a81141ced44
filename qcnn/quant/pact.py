"""PACT: parameterized clipping activation (Choi et al., arXiv 1805.06085).

Unsigned (after ReLU), ``k`` bits, ``n = 2^k - 1``, learned clip level ``alpha > 0`` per layer:

Forward   ``y = clip(x, 0, alpha);  y_q = round(y n / alpha) alpha / n``
Backward  ``dy_q/dx = 1`` for ``0 <= x < alpha``, else 0 (straight through the rounding);
          ``dy_q/dalpha = 1`` for ``x >= alpha``, else 0 (PACT eq. 3: the rounding is passed straight
          through, so the in-range outputs do not depend on alpha).

Signed variant (feature maps without a ReLU in front, which PACT ignores; used automatically where the
consumed activation can be negative), ``n = 2^(k-1) - 1`` (1 bit: ``y_q = alpha sign(x)``):

Forward   ``y = clip(x, -alpha, alpha);  y_q = round(y n / alpha) alpha / n``
Backward  ``dy_q/dx = 1`` for ``-alpha < x < alpha``, else 0;
          ``dy_q/dalpha = +1`` for ``x >= alpha``, ``-1`` for ``x <= -alpha``, else 0.

``alpha`` is a parameter (init 10 as in the paper's CIFAR experiments; fine-tuning aids, not in the paper:
``init_percentile`` starts it at that percentile of ``|x|`` over the calibration data, ``init_mse`` at the
value minimising ``||x - y_q||^2`` on the calibration data, searched over 161 geometrically spaced candidates
in [1e-4 max|x|, max|x|]), ``init_mean`` at ``2 sqrt(n) mean|x|`` (the top of LSQ's initial grid, which
clips heavy tails far more than the MSE optimum does). It is used as
``max(alpha, 1e-4)`` so a collapsing alpha cannot divide by zero. The paper regularises alpha with L2
(``alpha_decay``, default 2e-4); :meth:`PACTMethod.param_groups` puts every alpha in its own optimiser
group with that decay and keeps it out of the ordinary weight decay.

Weights are DoReFa's (tanh form, sign for 1 bit; :mod:`qcnn.quant.dorefa`), as in the paper. First/last
layers at 8 bits use the uniform int8 grid (:class:`~qcnn.methods.base.EdgeUniformMethod`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, geometric_mse_search

ALPHA_MIN = 1e-4
#: at most this many elements per batch enter the calibration percentile
_SAMPLE = 1 << 18


def _pact_forward(x: Tensor, a: Tensor, n: int, signed: bool) -> Tensor:
    """``round(clip(x, lo, a) n / a) a / n`` (``lo = -a`` signed, else 0; ``a`` already floored): the fused kernel."""
    lo = -a if signed else torch.zeros_like(a)
    y = torch.minimum(torch.maximum(x, lo), a)
    return torch.round(y * (n / a)) * (a / n)


def _pact_backward(g: Tensor, x: Tensor, a: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(dx, dalpha): ``g`` on ``lo <= x < a`` (``-a < x < a`` signed), and ``sum g [x >= a]`` (minus
    ``sum g [x <= -a]`` signed), masks recomputed from ``x``, alpha's gradient reduced in the same pass."""
    above = x >= a
    if signed:
        below = x <= -a
        gx = g * (~(above | below)).to(g.dtype)
        ga = (g * (above.to(g.dtype) - below.to(g.dtype))).sum()
    else:
        gx = g * ((x >= 0) & ~above).to(g.dtype)
        ga = (g * above.to(g.dtype)).sum()
    return gx, ga.reshape(a.shape)


def _pact_sign_forward(x: Tensor, a: Tensor) -> Tensor:
    """``a sign(x)`` (``sign(0) = +1``): the 1-bit signed kernel."""
    return torch.where(x >= 0, a, -a)


def _pact_sign_backward(g: Tensor, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """(dx, dalpha) of 1-bit signed PACT: ``g`` on ``|x| < a``; ``sum g sign(x) [|x| >= a]``."""
    outside = x.abs() >= a
    gx = g * (~outside).to(g.dtype)
    ga = (g * outside.to(g.dtype) * torch.where(x >= 0, 1.0, -1.0)).sum()
    return gx, ga.reshape(a.shape)


class _PactFn(torch.autograd.Function):
    """PACT through :mod:`qcnn.quant.kernels`: saves ``x`` and the floored alpha, one pass each way."""

    @staticmethod
    def forward(ctx, x, alpha, n: int, signed: bool):
        a = alpha.clamp_min(ALPHA_MIN)
        ctx.save_for_backward(x, a)
        ctx.signed = signed
        return kernels.call(_pact_forward, x, a, n, signed)

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        gx, ga = kernels.call(_pact_backward, g.contiguous(), x, a, ctx.signed)
        return gx, ga, None, None


class _PactSignFn(torch.autograd.Function):
    """1-bit signed PACT: ``alpha sign(x)``; d/dx = 1 on ``|x| < alpha``, d/dalpha = ``sign(x)`` on ``|x| >= alpha``."""

    @staticmethod
    def forward(ctx, x, alpha):
        a = alpha.clamp_min(ALPHA_MIN)
        ctx.save_for_backward(x, a)
        return kernels.call(_pact_sign_forward, x, a)

    @staticmethod
    def backward(ctx, g):
        x, a = ctx.saved_tensors
        return kernels.call(_pact_sign_backward, g.contiguous(), x, a)


def pact(x: Tensor, alpha: Tensor, bits: int, signed: bool = False) -> Tensor:
    """Functional PACT (see module docstring)."""
    if signed and bits == 1:
        return _PactSignFn.apply(x, alpha)
    n = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    return _PactFn.apply(x, alpha, n, signed)


class PACTQuantizer(Quantizer):
    """PACT activation quantizer with a learned clip level ``alpha`` (a 0-d parameter)."""

    def __init__(self, bits: int, signed: bool = False, alpha_init: float = 10.0,
                 init_percentile: float | None = None, init_mse: bool = False, init_mean: bool = False):
        super().__init__(bits, signed)
        if not alpha_init > 0:
            raise ValueError(f"alpha_init={alpha_init!r} must be positive")
        if init_percentile is not None and not 0 < init_percentile <= 100:
            raise ValueError(f"init_percentile={init_percentile!r} must lie in (0, 100]")
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.init_percentile = init_percentile
        self.init_mse = init_mse
        self.init_mean = init_mean
        self._samples: list[Tensor] = []
        self.register_buffer("calib_sum", torch.zeros(()))
        self.register_buffer("calib_count", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            if self.init_percentile is not None or self.init_mse or self.init_mean:
                self._observe(x)
            return x
        return pact(x, self.alpha, self.bits, self.signed)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        v = x.detach().flatten()
        v = v.abs() if self.signed else v.clamp_min(0)
        if v.numel() > _SAMPLE:
            v = v[torch.randint(0, v.numel(), (_SAMPLE,), device=v.device)]
        if self.init_mean:
            self.calib_sum += (x.detach().abs() if self.signed else x.detach().clamp_min(0)).float().mean()
            self.calib_count += 1
            return
        if self.init_mse:
            self._samples.append(x.detach().flatten()[torch.randint(0, x.numel(), (min(x.numel(), _SAMPLE),),
                                                                   device=x.device)].float())
            return
        self.calib_sum += torch.quantile(v.float(), self.init_percentile / 100.0)
        self.calib_count += 1

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self.init_mean and int(self.calib_count) > 0:
            n = 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1
            self.alpha.copy_((2 * math.sqrt(max(n, 1)) * self.calib_sum / self.calib_count).clamp_min(ALPHA_MIN))
        elif self.init_mse and self._samples:
            x = torch.cat(self._samples)
            self._samples = []
            top = float((x.abs() if self.signed else x.clamp_min(0)).max().clamp_min(ALPHA_MIN))
            self.alpha.copy_(geometric_mse_search(x, top, lambda v, a: pact(v, a, self.bits, self.signed)))
        elif self.init_percentile is not None and int(self.calib_count) > 0:
            self.alpha.copy_((self.calib_sum / self.calib_count).clamp_min(ALPHA_MIN))

    def grid(self) -> Grid:
        a = self.alpha.detach().clamp_min(ALPHA_MIN)
        if self.signed and self.bits == 1:
            return Grid(bits=1, signed=True, levels=torch.stack([-a, a]), int_levels=torch.tensor([-1, 1]), scale=a)
        n = 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1
        return Grid(bits=self.bits, signed=self.signed, scale=a / n, zero_point=torch.tensor(0, dtype=torch.int32),
                    qmin=-n if self.signed else 0, qmax=n)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, alpha={float(self.alpha.detach()):.4g}"


__all__ = ["PACTQuantizer", "pact"]

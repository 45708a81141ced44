"""WRPN: wide reduced-precision networks (Mishra et al., arXiv 1709.01134).

Activations (unsigned, after ReLU), ``k`` bits:
    Forward   ``a_q = round((2^k - 1) clip(a, 0, 1)) / (2^k - 1)``
    Backward  straight through, masked to ``0 <= a <= 1``
    (the same function as DoReFa's activation quantizer; inputs without a ReLU in front take the signed
    form below on ``clip(a, -1, 1)``).
Weights (signed), ``k`` bits, ``n = 2^(k-1) - 1`` (2 bits = ternary {-1, 0, 1}):
    Forward   ``w_q = s round(n clip(w / s, -1, 1)) / n``
    Backward  straight through, masked to ``|w / s| <= 1``; ``s`` is a constant for autograd.
    ``s`` is the option ``weight_scale``: ``none`` (``s = 1``, the paper's formula taken literally: the
    grid is fixed on [-1, 1]) or ``max`` (``s = max|w|`` per output channel with ``per_channel`` recipes,
    per layer otherwise). A network trained from scratch grows its weights onto the fixed grid; starting
    from a float checkpoint most weights satisfy ``|w| < 1/(2n)`` and the literal form rounds them to 0,
    so the recipe uses ``max``.
1-bit weights: ``w_q = s sign(w)`` (``sign(0) = +1``), identity backward. The paper does not state the
    scale (check); ``binary_scale`` chooses ``mean`` (``s = mean|w|``, XNOR/DoReFa, default), ``max`` or
    ``none`` (``s = 1``). With fused kernels on, the mean is a float32 sum in the compiled kernel's order, so the
    fused 1-bit scale (and output) may differ from the eager one by float rounding (an ulp).

Widening is a property of the network, not of the quantizer: build the model with the zoo's ``width``
multiplier (``build_model("resnet20", width=2.0)``, ``qcnn qat --width 2``) and quantize it with this method.
First/last layers at 8 bits use the uniform int8 grid (:class:`~qcnn.methods.base.EdgeUniformMethod`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, ScaleBufferMixin, binary_sign
from qcnn.quant.dorefa import _IdentityGradFn

EPS = 1e-8
SCALES = ("none", "max", "mean")


def _channel_reduce(w: Tensor, how: str, per_channel: bool) -> Tensor:
    """``s``: 1, ``max|w|`` or ``mean|w|`` (per output channel, keepdim), floored at ``EPS``. The mean is a float32
    sum: a compiled kernel's reduction order may change it by rounding (the max is exact in any order)."""
    a = w.detach().abs()
    if how == "none":
        return torch.ones((), device=w.device, dtype=w.dtype)
    if per_channel and w.dim() > 1:
        flat = a.reshape(a.shape[0], -1)
        s = flat.amax(dim=1) if how == "max" else flat.mean(dim=1)
        return s.reshape([-1] + [1] * (w.dim() - 1)).clamp_min(EPS)
    return (a.max() if how == "max" else a.mean()).clamp_min(EPS)


def _wrpn_forward(w: Tensor, n: int, how: str, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(``s round(n clip(w / s, -1, 1)) / n``, ``s``): the k-bit weight kernel, the scale's reduction included."""
    s = _channel_reduce(w, how, per_channel)
    return torch.round((w / s).clamp(-1.0, 1.0) * n) / n * s, s


def _wrpn_backward(g: Tensor, w: Tensor, s: Tensor) -> Tensor:
    """``g [|w / s| <= 1]`` in the ops of autograd's chain ``(g s) [|v| <= 1] / s``, ``v = w / s`` recomputed."""
    return g * s * ((w / s).abs() <= 1.0).to(g.dtype) / s


def _binary_forward(w: Tensor, how: str, per_channel: bool) -> tuple[Tensor, Tensor]:
    """(``w + (s sign(w) - w)``, ``s``): the 1-bit weight kernel (identity backward), the reduction included."""
    s = _channel_reduce(w, how, per_channel)
    return w + (binary_sign(w) * s - w), s


class _WRPNFn(torch.autograd.Function):
    """The k-bit WRPN weight through :mod:`qcnn.quant.kernels`: saves ``w`` and ``s``, one kernel each way."""

    @staticmethod
    def forward(ctx, w, n: int, how: str, per_channel: bool):
        y, s = kernels.call(_wrpn_forward, w, n, how, per_channel)
        ctx.mark_non_differentiable(s)
        ctx.save_for_backward(w, s)
        return y, s

    @staticmethod
    def backward(ctx, g, _gs):
        w, s = ctx.saved_tensors
        return kernels.call(_wrpn_backward, g.contiguous(), w, s), None, None, None


class WRPNWeight(ScaleBufferMixin, Quantizer):
    """WRPN weight quantizer (module docstring). The scale of the last forward is kept in ``scale``."""

    def __init__(self, bits: int, weight_scale: str = "none", binary_scale: str = "mean", per_channel: bool = False):
        super().__init__(bits, signed=True)
        for name, v in (("weight_scale", weight_scale), ("binary_scale", binary_scale)):
            if v not in SCALES:
                raise ValueError(f"{name}={v!r} is not one of {SCALES}")
        if weight_scale == "mean":
            raise ValueError("weight_scale='mean' is only meaningful for 1-bit weights (binary_scale)")
        self.weight_scale = weight_scale
        self.binary_scale = binary_scale
        self.per_channel = per_channel
        self.register_buffer("scale", torch.ones(()))

    def forward(self, w: Tensor) -> Tensor:
        if self.bits == 1:
            y, s = _IdentityGradFn.apply(w, _binary_forward, self.binary_scale, self.per_channel)
        else:
            y, s = _WRPNFn.apply(w, 2 ** (self.bits - 1) - 1, self.weight_scale, self.per_channel)
        self.scale = s.flatten() if s.dim() else s
        return y

    def grid(self) -> Grid:
        s = self.scale.detach().clone()
        axis = 0 if s.dim() else None
        if self.bits == 1 and axis is None:
            return Grid(bits=1, signed=True, levels=torch.stack([-s, s]), int_levels=torch.tensor([-1, 1]), scale=s)
        if self.bits == 1:  # per channel: codes +-1 (0 unused) times the channel's scale
            return Grid(bits=1, signed=True, scale=s, zero_point=torch.zeros_like(s, dtype=torch.int32), axis=0,
                        qmin=-1, qmax=1)
        n = 2 ** (self.bits - 1) - 1
        return Grid(bits=self.bits, signed=True, scale=s / n, zero_point=torch.zeros_like(s, dtype=torch.int32),
                    axis=axis, qmin=-n, qmax=n)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, weight_scale={self.weight_scale}, binary_scale={self.binary_scale}"


__all__ = ["WRPNWeight"]

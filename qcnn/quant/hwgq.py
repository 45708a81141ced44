"""HWGQ: half-wave Gaussian quantization (Cai et al., CVPR 2017, arXiv 1702.00953).

The activation entering a layer is a batch-normalised pre-activation, roughly ``N(0, 1)``, passed through
a ReLU. HWGQ replaces the ReLU's positive half by the optimal quantizer of the half-normal density
``2 phi(x)`` on ``x > 0``, with ``L = 2^k - 1`` positive levels ``q_1 < ... < q_L``:

Forward   ``Q(x) = 0`` for ``x <= 0``; ``Q(x) = q_i`` for ``t_{i-1} < x <= t_i`` with ``t_0 = 0``,
          ``t_i = (q_i + q_{i+1}) / 2``, ``t_L = inf`` (every positive input goes to its nearest positive
          level; 0 only takes the negative half-wave).
Backward  clipped ReLU: ``dQ/dx = 1`` for ``0 < x <= q_L``, else 0; optionally (``log_tail``) the
          log-tailed ReLU ``dQ/dx = 1 / (x - tau)``, ``tau = q_L - 1``, for ``x > q_L``.

Levels (paper, and recomputed by :func:`half_normal_levels` which solves the same problems numerically):
    1 bit: ``{0.798}`` (= E|X|, both kinds);
    2 bits uniform ``{0.538, 1.076, 1.614}`` (the step ``d`` minimising the MSE of ``{d, 2d, 3d}``);
    2 bits non-uniform (Lloyd-Max) ``{0.318, 1.000, 1.894}``.
More bits use the numerical solution.

Weights: binary ``w_q = sign(w) mean|w|`` with one mean per output channel (XNOR-style), identity
backward (``dL/dw = dL/dw_q``). ``w_bits > 1`` (not in the paper) uses the symmetric uniform grid.

BatchNorm and which inputs get the fixed levels. The levels are optimal for a standard normal
pre-activation, so they are applied as they are only to a *normalised* input: the output of a BatchNorm
without affine part, seen through operations that commute with the quantizer (ReLU/ReLU6: ``Q`` is 0 on
``x <= 0`` and saturates far below 6; max pooling: ``Q`` is monotone, so ``Q(maxpool(x)) = maxpool(Q(x))``;
flatten/view/reshape/identity). This is the placement of the official Caffe code (zhaoweicai/hwgq,
``examples/*/train_val.prototxt``): every BatchNorm directly in front of a ``Quant`` layer has no ``Scale``
layer (it only normalises), while the BatchNorm at the end of each residual branch and of each projection
shortcut, i.e. in front of an ``Eltwise`` add, has one (``scale*_branch2b_end``, ``scale*_branch1``), and so
does the last BatchNorm of the CIFAR VGG, in front of the float classifier (``bn3`` + ``scale3``).
:meth:`HWGQMethod.prepare` traces the model (``torch.fx``) and, with ``bn_affine: auto`` (default):

* a BatchNorm whose output reaches the HWGQ quantizer of a hidden layer through the operations above loses
  gamma and beta (``affine=False``, running statistics kept): that quantizer sees ``N(0, 1)``. A BatchNorm
  that also feeds a residual add loses them as well, as ``bn1`` of the official ResNet-18 (it feeds
  ``qt2a_branch2a`` and the ``res2a`` shortcut) does;
* every other BatchNorm keeps gamma and beta: one whose output feeds a residual add only (the branch-end
  ``bn2`` of every CIFAR ResNet block), reaches the classifier (the last layer: 8-bit uniform input with
  ``first_last: 8bit``), or reaches a layer through anything else (average pooling changes the variance, a
  residual sum has its own scale).

On ResNet-20 this strips the stem ``bn1`` and each block's ``bn1`` (10 BNs) and keeps each block's ``bn2``
(9 BNs); on LeNet-5 it strips ``bn1`` and ``bn2`` (both followed by ReLU and max pooling).
An HWGQ quantizer whose input is not normalised that way (after a residual add and ReLU, after a Linear
without BatchNorm, after average pooling) applies the levels to the input divided by its scale,
``Q_s(x) = s Q(x / s)`` (the half-wave Gaussian quantizer of ``N(0, s^2)``), with ``s^2 = E[x^2 | x > 0]``,
the variance of the symmetric pre-activation that the half-wave model assumes: set by calibration, then
an EMA of the batch values in training (momentum 0.1; the batch's sum of squares computed in the same kernel as
the quantizer when fused kernels are on, a float32 sum in the compiled kernel's order there, so that the fused
``s`` may differ from the eager one by float rounding), fixed in eval mode (:class:`HWGQActivation` with
``normalized=False``). The layer is only named by its input, so a layer left in float by an override keeps
its BatchNorm affine. ``bn_affine: false`` strips every BatchNorm (the earlier behaviour of qcnn; the
quantizers right behind a BN then see ``N(0, 1)``, the others are scaled), ``bn_affine: true`` strips none
(every HWGQ quantizer is scaled). First/last layers at 8 bits use the uniform int8 grid
(:class:`~qcnn.methods.base.EdgeUniformMethod`); the first layer's input (the image) is never HWGQ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, ScaleBufferMixin, binary_sign, check_bits
from qcnn.quant.dorefa import _IdentityGradFn

EPS = 1e-8
#: levels printed in the paper (half-normal, standard-normal input)
PAPER_LEVELS = {
    ("uniform", 1): (0.798,),
    ("lloyd", 1): (0.798,),
    ("uniform", 2): (0.538, 1.076, 1.614),
    ("lloyd", 2): (0.318, 1.000, 1.894),
}
KINDS = ("uniform", "lloyd")


def _phi(x: float) -> float:
    return 0.0 if math.isinf(x) else math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x: float) -> float:
    return 1.0 if math.isinf(x) else 0.5 * (1.0 + math.erf(x / math.sqrt(2)))


def half_normal_mse(levels: list[float]) -> float:
    """E[(X - Q(X))^2] for X half-normal and Q the nearest-positive-level quantizer of ``levels``."""
    t = [0.0] + [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:])] + [math.inf]
    total = 0.0
    for (a, b), q in zip(zip(t[:-1], t[1:]), levels):
        bphi = 0.0 if math.isinf(b) else b * _phi(b)
        # int_a^b (x - q)^2 phi(x) dx
        total += (1 + q * q) * (_Phi(b) - _Phi(a)) - (bphi - a * _phi(a)) - 2 * q * (_phi(a) - _phi(b))
    return 2.0 * total


def half_normal_levels(n_levels: int, kind: str = "lloyd", iters: int = 500) -> list[float]:
    """Optimal positive levels of a half-normal: Lloyd-Max (``lloyd``) or the best step of ``{d, 2d, ..}``
    (``uniform``), solved numerically."""
    if n_levels < 1:
        raise ValueError(f"n_levels={n_levels!r} must be >= 1")
    if kind == "lloyd":
        q = [3.0 * (i + 1) / n_levels for i in range(n_levels)]
        for _ in range(iters):  # Lloyd: thresholds at midpoints, levels at conditional means
            t = [0.0] + [(a + b) / 2 for a, b in zip(q[:-1], q[1:])] + [math.inf]
            q = [(_phi(a) - _phi(b)) / (_Phi(b) - _Phi(a)) for a, b in zip(t[:-1], t[1:])]
        return q
    if kind == "uniform":
        lo, hi = 1e-4, 4.0  # golden-section search on the step (the MSE is unimodal in d)
        r = (math.sqrt(5) - 1) / 2
        f = lambda d: half_normal_mse([d * (i + 1) for i in range(n_levels)])
        for _ in range(200):
            a, b = hi - r * (hi - lo), lo + r * (hi - lo)
            if f(a) < f(b):
                hi = b
            else:
                lo = a
        d = (lo + hi) / 2
        return [d * (i + 1) for i in range(n_levels)]
    raise ValueError(f"HWGQ levels={kind!r} is not one of {KINDS}")


def hwgq_levels(bits: int, kind: str = "uniform") -> list[float]:
    """The paper's levels for 1 and 2 bits, the numerical solution beyond."""
    check_bits(bits, "HWGQ activation bits", hi=8)
    if kind not in KINDS:
        raise ValueError(f"HWGQ levels={kind!r} is not one of {KINDS}")
    return list(PAPER_LEVELS.get((kind, bits)) or half_normal_levels(2**bits - 1, kind))


def _hwgq_quant(x: Tensor, levels: Tensor, thresholds: Tensor | None, n_levels: int) -> Tensor:
    """``Q(x)`` by table look-up (any levels) or, for a uniform grid (``thresholds`` None), arithmetically: the
    level index of ``x > 0`` is ``clamp(ceil(x/d - 1/2), 1, L)``, the same half-open intervals."""
    if thresholds is None:
        d = levels[0]
        y = torch.ceil(x / d - 0.5).clamp(1, n_levels) * d
    else:
        y = levels[torch.bucketize(x, thresholds)]
    return torch.where(x > 0, y, torch.zeros_like(y))


def _hwgq_grad(g: Tensor, x: Tensor, qmax: Tensor, log_tail: bool) -> Tensor:
    """``g dQ/dx``: the clipped ReLU's ``[0 < x <= q_L]`` (plus the log tail ``1 / (x - tau)`` beyond)."""
    inside = ((x > 0) & (x <= qmax)).to(g.dtype)
    if not log_tail:
        return g * inside
    tail = torch.where(x > qmax, 1.0 / (x - (qmax - 1.0)).clamp_min(EPS), torch.zeros_like(x))
    return g * (inside + tail)


def _hwgq_forward(x: Tensor, s: Tensor | None, levels: Tensor, thresholds: Tensor | None, n_levels: int) -> Tensor:
    """``Q(x)``, or ``s Q(x / s)`` with a scale ``s``: the activation kernel."""
    if s is None:
        return _hwgq_quant(x, levels, thresholds, n_levels)
    return s * _hwgq_quant(x / s, levels, thresholds, n_levels)


def _positive_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of x^2 over x > 0, number of x > 0) as 0-d tensors on x's device (float32 sum, int64 count)."""
    x = x.detach()
    pos = x.clamp_min(0).float()
    return (pos * pos).sum(), (x > 0).sum()


def _hwgq_track_forward(x: Tensor, sigma: Tensor, initialized: Tensor, momentum: float, levels: Tensor,
                        thresholds: Tensor | None, n_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """The training step of the scaled quantizer in one kernel: the EMA step of ``s`` towards the batch's
    ``sqrt(E[x^2 | x > 0])``, then ``s Q(x / s)`` with the new ``s``: (output, new ``sigma``, new ``initialized``).
    Eagerly the ops of the plain EMA step; compiled, the float32 sum of squares runs in another order, so the new
    ``s`` (and through it the output and gradient) may differ by float rounding."""
    sq, n = _positive_moments(x)
    sb = torch.sqrt(sq / n.clamp_min(1)).clamp_min(EPS)
    ema = torch.where(initialized, (1 - momentum) * sigma + momentum * sb, sb)
    sigma = torch.where(n > 0, ema, sigma)
    return _hwgq_forward(x, sigma.to(x.dtype), levels, thresholds, n_levels), sigma, initialized | (n > 0)


def _hwgq_backward(g: Tensor, x: Tensor, s: Tensor | None, qmax: Tensor, log_tail: bool) -> Tensor:
    """``g dQ/dx``, or with a scale autograd's chain ``(g s) Q'(x / s) / s``, recomputed from ``x``."""
    if s is None:
        return _hwgq_grad(g, x, qmax, log_tail)
    return _hwgq_grad(g * s, x / s, qmax, log_tail) / s


class _HWGQFn(torch.autograd.Function):
    """``Q(x)`` or ``s Q(x / s)`` through :mod:`qcnn.quant.kernels` (saves ``x``, one kernel each way); with
    ``track`` (training, scaled) the EMA step of ``s`` runs in the forward kernel and the new ``(sigma,
    initialized)`` are returned beside the output."""

    @staticmethod
    def forward(ctx, x, s, levels: Tensor, thresholds: Tensor | None, log_tail: bool, track: tuple | None):
        ctx.log_tail = log_tail
        if track is None:
            y = kernels.call(_hwgq_forward, x, s, levels, thresholds, levels.numel())
            ctx.save_for_backward(x, s, levels[-1])
            return y
        initialized, momentum = track
        y, sigma, init = kernels.call(_hwgq_track_forward, x, s, initialized, momentum, levels, thresholds,
                                      levels.numel())
        s = sigma.to(x.dtype)
        ctx.mark_non_differentiable(sigma, init)
        ctx.save_for_backward(x, s, levels[-1])
        return y, sigma, init

    @staticmethod
    def backward(ctx, g, *_):
        x, s, qmax = ctx.saved_tensors
        gx = kernels.call(_hwgq_backward, g.contiguous(), x, s, qmax, ctx.log_tail)
        return gx, None, None, None, None, None


class HWGQActivation(Quantizer):
    """Half-wave Gaussian activation quantizer with ``uniform`` or ``lloyd`` levels (module docstring).

    ``normalized=True``: the input is a normalised BN output, the levels are used as they are.
    ``normalized=False``: ``s Q(x / s)`` with ``s = sqrt(E[x^2 | x > 0])`` of the input, from calibration,
    updated in training by ``s <- (1 - momentum) s + momentum s_batch`` and fixed in eval mode.
    """

    def __init__(self, bits: int, levels: str = "uniform", log_tail: bool = False, normalized: bool = True,
                 momentum: float = 0.1):
        super().__init__(bits, signed=False)
        self.kind = levels
        self.log_tail = log_tail
        self.normalized = bool(normalized)
        self.momentum = float(momentum)
        lv = torch.tensor(hwgq_levels(bits, levels), dtype=torch.float32)
        self.register_buffer("levels", lv)
        self.register_buffer("thresholds", (lv[:-1] + lv[1:]) / 2)
        if not self.normalized:
            self.register_buffer("sigma", torch.ones(()))
            self.register_buffer("initialized", torch.tensor(False))
            self._sum_sq = 0.0
            self._count = 0
        self._ready = normalized  # initialisation checked once, then no host sync per call

    def is_initialized(self) -> bool:
        return self.normalized or bool(self.initialized)

    _positive_moments = staticmethod(_positive_moments)

    def finish_calibration(self) -> None:
        if self.normalized or self._count == 0:
            return
        self.sigma.fill_(max(math.sqrt(self._sum_sq / self._count), EPS))
        self.initialized.fill_(True)
        self._ready = True
        self._sum_sq, self._count = 0.0, 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the scaled quantizer used the N(0, 1) levels as they are: s = 1
        if not self.normalized and prefix + "levels" in state_dict and prefix + "sigma" not in state_dict:
            state_dict[prefix + "sigma"] = torch.ones(())
            state_dict[prefix + "initialized"] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = self.normalized

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            if not self.normalized:
                sq, n = self._positive_moments(x)
                self._sum_sq += float(sq)
                self._count += int(n)
            return x
        lv = self.levels.to(x.dtype)
        th = None if self.kind == "uniform" else self.thresholds.to(x.dtype)
        if self.normalized:
            return _HWGQFn.apply(x, None, lv, th, self.log_tail, None)
        if self.training:  # EMA step of s towards the batch's sqrt(E[x^2 | x > 0]), fused with the quantizer
            y, sigma, init = _HWGQFn.apply(x, self.sigma, lv, th, self.log_tail, (self.initialized, self.momentum))
            with torch.no_grad():
                self.sigma.copy_(sigma)
                self.initialized.copy_(init)
            return y
        if not self._ready:
            self._ready = self._require_initialized()
        return _HWGQFn.apply(x, self.sigma.to(x.dtype), lv, th, self.log_tail, None)

    def scale(self) -> Tensor:
        """The factor ``s`` the N(0, 1) levels are multiplied by (1 for a normalised input)."""
        if self.normalized:
            return torch.ones((), device=self.levels.device)
        return self.sigma.detach().clone()

    def grid(self) -> Grid:
        s = self.scale()
        if self.kind == "uniform":
            return Grid(bits=self.bits, signed=False, scale=(self.levels[0].detach() * s).clone(),
                        zero_point=torch.tensor(0, dtype=torch.int32), qmin=0, qmax=len(self.levels))
        lv = torch.cat([torch.zeros(1), (self.levels.detach() * s).cpu()])
        return Grid(bits=self.bits, signed=False, levels=lv)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, levels={self.kind}, log_tail={self.log_tail}, normalized={self.normalized}"


def _channel_binary_forward(w: Tensor) -> tuple[Tensor, Tensor]:
    """(``w + (sign(w) s - w)``, ``s``), ``s = mean|w|`` per output channel (float32; the compiled kernel's sum runs
    in another order, so the fused ``s`` may differ by rounding): the binary weight kernel, reduction included."""
    a = w.detach().abs()
    s = a.reshape(a.shape[0], -1).mean(dim=1) if w.dim() > 1 else a.mean()
    sb = s.reshape([-1] + [1] * (w.dim() - 1)) if w.dim() > 1 else s
    return w + (binary_sign(w) * sb - w), s


class BinaryChannelWeight(ScaleBufferMixin, Quantizer):
    """``sign(w) mean|w|`` with one mean per output channel; identity backward."""

    def __init__(self):
        super().__init__(1, signed=True)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, w: Tensor) -> Tensor:
        y, self.scale = _IdentityGradFn.apply(w, _channel_binary_forward)
        return y

    def grid(self) -> Grid:
        s = self.scale.detach().clone()
        return Grid(bits=1, signed=True, scale=s, zero_point=torch.zeros_like(s, dtype=torch.int32),
                    axis=0 if s.dim() else None, qmin=-1, qmax=1)


__all__ = ["BinaryChannelWeight", "HWGQActivation", "PAPER_LEVELS", "half_normal_levels", "half_normal_mse",
           "hwgq_levels"]

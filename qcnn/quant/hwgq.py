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

BatchNorm: the levels assume a standard normal input, so :meth:`HWGQMethod.prepare` turns off the
affine part (gamma, beta) of every BatchNorm layer of the model (``bn_affine=False``, default); the
running statistics are kept. ``bn_affine=True`` keeps gamma and beta (then the levels apply to
``N(beta, gamma^2)`` inputs). First/last layers at 8 bits use the uniform int8 grid
(:class:`~qcnn.quant.dorefa.EdgeUniformMethod`); the first layer's input (the image) is never HWGQ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qcnn.quant.base import Grid, Quantizer, check_bits
from qcnn.quant.dorefa import EdgeUniformMethod, ScaleBufferMixin, binary_sign
from qcnn.quant.registry import LayerContext, Method, register_method

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


class _HWGQFn(torch.autograd.Function):
    """Forward by table look-up (any levels) or, for a uniform grid (``thresholds`` None), arithmetically:
    the level index of ``x > 0`` is ``clamp(ceil(x/d - 1/2), 1, L)``, the same half-open intervals."""

    @staticmethod
    def forward(ctx, x, levels: Tensor, thresholds: Tensor | None, log_tail: bool):
        qmax = levels[-1]
        ctx.save_for_backward(x, qmax)
        ctx.log_tail = log_tail
        if thresholds is None:
            d = levels[0]
            y = torch.ceil(x / d - 0.5).clamp_(1, levels.numel()) * d
        else:
            y = levels[torch.bucketize(x, thresholds)]
        return torch.where(x > 0, y, torch.zeros_like(y))

    @staticmethod
    def backward(ctx, g):
        x, qmax = ctx.saved_tensors
        inside = ((x > 0) & (x <= qmax)).to(g.dtype)
        if not ctx.log_tail:
            return g * inside, None, None, None
        tail = torch.where(x > qmax, 1.0 / (x - (qmax - 1.0)).clamp_min(EPS), torch.zeros_like(x))
        return g * (inside + tail), None, None, None


class HWGQActivation(Quantizer):
    """Half-wave Gaussian activation quantizer with ``uniform`` or ``lloyd`` levels (module docstring)."""

    def __init__(self, bits: int, levels: str = "uniform", log_tail: bool = False):
        super().__init__(bits, signed=False)
        self.kind = levels
        self.log_tail = log_tail
        lv = torch.tensor(hwgq_levels(bits, levels), dtype=torch.float32)
        self.register_buffer("levels", lv)
        self.register_buffer("thresholds", (lv[:-1] + lv[1:]) / 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            return x
        lv = self.levels.to(x.dtype)
        th = None if self.kind == "uniform" else self.thresholds.to(x.dtype)
        return _HWGQFn.apply(x, lv, th, self.log_tail)

    def grid(self) -> Grid:
        lv = torch.cat([torch.zeros(1), self.levels.detach().cpu()])
        if self.kind == "uniform":
            return Grid(bits=self.bits, signed=False, scale=self.levels[0].detach().clone(),
                        zero_point=torch.tensor(0, dtype=torch.int32), qmin=0, qmax=len(self.levels))
        return Grid(bits=self.bits, signed=False, levels=lv)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, levels={self.kind}, log_tail={self.log_tail}"


class BinaryChannelWeight(ScaleBufferMixin, Quantizer):
    """``sign(w) mean|w|`` with one mean per output channel; identity backward."""

    def __init__(self):
        super().__init__(1, signed=True)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, w: Tensor) -> Tensor:
        a = w.detach().abs()
        s = a.reshape(a.shape[0], -1).mean(dim=1) if w.dim() > 1 else a.mean()
        self.scale = s
        s = s.reshape([-1] + [1] * (w.dim() - 1)) if w.dim() > 1 else s
        return w + (binary_sign(w) * s - w).detach()

    def grid(self) -> Grid:
        s = self.scale.detach().clone()
        return Grid(bits=1, signed=True, scale=s, zero_point=torch.zeros_like(s, dtype=torch.int32),
                    axis=0 if s.dim() else None, qmin=-1, qmax=1)


@dataclass
class HWGQOptions:
    #: ``uniform`` ({0.538, 1.076, 1.614} at 2 bits) or ``lloyd`` (Lloyd-Max {0.318, 1.0, 1.894})
    levels: str = "uniform"
    #: log-tailed ReLU backward above the top level
    log_tail: bool = False
    #: keep BatchNorm's gamma/beta (False: the paper's BN without affine in front of the quantizer)
    bn_affine: bool = False


@register_method
class HWGQMethod(EdgeUniformMethod):
    """HWGQ activations (after ReLU), binary per-channel weights, BatchNorm without affine."""

    name = "hwgq"
    Options = HWGQOptions
    #: levels are solved for up to 8 bits (the paper prints 1 and 2)
    act_bits = tuple(range(1, 9))

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.levels not in KINDS:
            raise ValueError(f"HWGQ levels={self.options.levels!r} is not one of {KINDS}")

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.options.bn_affine:
            return model
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.affine = False
                m.weight = None
                m.bias = None
        return model

    def low_weight(self, ctx: LayerContext) -> Quantizer:
        if ctx.w_bits == 1:
            return BinaryChannelWeight()
        return Method.weight_quantizer(self, ctx)

    def low_act(self, ctx: LayerContext) -> Quantizer:
        if ctx.input_signed:
            return self.calibrated_act(ctx.a_bits, True, ctx.calib)
        return HWGQActivation(ctx.a_bits, self.options.levels, self.options.log_tail)


__all__ = ["BinaryChannelWeight", "HWGQActivation", "HWGQMethod", "PAPER_LEVELS", "half_normal_levels",
           "half_normal_mse", "hwgq_levels"]

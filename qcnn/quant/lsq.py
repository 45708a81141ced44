"""LSQ: learned step size quantization (Esser et al., ICLR 2020, arXiv 1902.08153).

Codes ``[-Q_N, Q_P]``: unsigned data ``Q_N = 0, Q_P = 2^b - 1``; signed ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1``.
Step size ``s > 0`` is a parameter (one per layer, or per output channel with ``per_channel``).

Forward   ``v = x / s;  x_q = round(clip(v, -Q_N, Q_P)) s``
Backward  ``dx_q/dx = 1`` for ``-Q_N <= v <= Q_P``, else 0 (straight through the rounding);
          ``dx_q/ds = round(v) - v`` for ``-Q_N <= v <= Q_P``, ``-Q_N`` below, ``Q_P`` above (LSQ eq. 3);
          the step's gradient is multiplied by ``g = 1 / sqrt(N Q_P)`` (LSQ sec. 2.2), ``N`` = number of
          weights of the layer (per output channel when per-channel) or features of one sample of the
          activation (``x.numel() / batch``).
Init      ``s = 2 mean|x| / sqrt(Q_P)``: from the weights when the quantizer is built, from the
          calibration batches (the mean of the per-batch ``mean|x|``) for activations. ``init="mse"``
          starts every step at the MSE-optimal step of its grid instead (the initialisation of LSQ+,
          Bhalgat et al. 2020): weights by :func:`qcnn.quant.uniform.mse_scale`, activations by a search
          over ``s = t / Q_P`` with ``t`` on a geometric grid below ``max|x|`` of a sample of the calibration
          data. At 2 bits the paper's ``2 mean|w|`` zeroes 50-70 % of a pretrained ResNet-20's weights, far
          more than the MSE step, and a short fine-tune does not learn the step back.

``s`` is used as ``max(s, 1e-8)``, so a step pushed to 0 or below cannot produce NaN.
As in the paper, the first and last layers (and the network input) at 8 bits are quantized with LSQ too.
1-bit signed data has no LSQ grid (``Q_P = 0``) and is refused.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qcnn.calib.observers import check_finite
from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, geometric_mse_search
from qcnn.quant.uniform import mse_scale

EPS = 1e-8
#: calibration elements kept per batch for the activations' MSE init
_SAMPLE = 1 << 18


@torch.no_grad()
def mse_step_geometric(x: Tensor, qn: int, qp: int) -> Tensor:
    """The step ``s = t / Q_P`` minimising ``mean (x - s round(clip(x / s, -Q_N, Q_P)))^2`` over the thresholds
    ``t`` of :func:`qcnn.quant.base.geometric_mse_search` below ``max|x|``."""
    x = x.detach().float().reshape(-1)

    def quantize(v: Tensor, t: Tensor) -> Tensor:
        s = t / qp
        return (v / s).clamp(-qn, qp).round() * s

    return geometric_mse_search(x, x.abs().max().clamp_min(EPS), quantize) / qp


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)`` of a ``bits``-bit LSQ grid."""
    if signed:
        if bits < 2:
            raise ValueError(f"LSQ needs bits >= 2 for signed data, got bits={bits!r}")
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _lsq_forward(x: Tensor, sb: Tensor, qn: int, qp: int) -> Tensor:
    """``round(clip(x / s, -Q_N, Q_P)) s`` with ``s`` the floored ``|step|`` (broadcast): the fused kernel."""
    v = x / sb
    return torch.round(v.clamp(-qn, qp)) * sb


def _lsq_backward(g: Tensor, x: Tensor, sb: Tensor, qn: int, qp: int) -> tuple[Tensor, Tensor]:
    """(dx, ds) before the grad scale: ``g [-Q_N <= v <= Q_P]`` and ``sum g (round(v) - v)`` inside, ``sum g
    (-Q_N)`` below, ``sum g Q_P`` above (LSQ eq. 3), ``v = x / s`` recomputed, reduced to ``sb``'s shape in the
    same pass."""
    v = x / sb
    q = torch.round(v.clamp(-qn, qp))
    inside = (v >= -qn) & (v <= qp)
    gx = g * inside.to(g.dtype)
    ds = g * torch.where(inside, q - v, q)
    return gx, kernels.reduce_like(ds, sb)


class _LsqFn(torch.autograd.Function):
    """LSQ through :mod:`qcnn.quant.kernels`: saves ``x`` (not ``v`` and the codes), one pass each way."""

    @staticmethod
    def forward(ctx, x, s, qn: int, qp: int, gscale: float, axis: int | None):
        # the grid uses |s|: a step that an optimizer update carries across 0 acts as its magnitude (and its
        # gradient below is exact for that), instead of a clamped EPS step whose gradient disagrees with the
        # forward and throws it to ~1e4 times its value (measured: LeNet-5 conv1, 0.003 -> -0.005 -> 32.8)
        mag = s.abs().clamp_min(EPS)
        sb = kernels.bcast(mag, x.dim(), axis)
        ctx.save_for_backward(x, sb, s)
        ctx.meta = (qn, qp, gscale)
        return kernels.call(_lsq_forward, x, sb, qn, qp)

    @staticmethod
    def backward(ctx, g):
        x, sb, s = ctx.saved_tensors
        qn, qp, gscale = ctx.meta
        gx, gs = kernels.call(_lsq_backward, g.contiguous(), x, sb, qn, qp)
        # the grad scale and sign(s) on the reduced (per-channel) gradient: a few elements, eager (a Python
        # float per layer inside the kernel would compile one variant per layer size)
        gs = gs.reshape(-1) if s.dim() > 0 else gs.reshape(())
        sign = torch.where(s < 0, -1.0, 1.0).to(gs.dtype).reshape(gs.shape)
        return gx, (gs * gscale * sign).reshape(s.shape), None, None, None, None


def lsq(x: Tensor, s: Tensor, bits: int, signed: bool, grad_scale: float | None = None,
        axis: int | None = None) -> Tensor:
    """Functional LSQ; ``grad_scale=None`` uses ``1/sqrt(N Q_P)`` with ``N`` = elements per step value."""
    qn, qp = lsq_range(bits, signed)
    return lsq_codes(x, s, qn, qp, grad_scale, axis)


def lsq_codes(x: Tensor, s: Tensor, qn: int, qp: int, grad_scale: float | None = None,
              axis: int | None = None) -> Tensor:
    """:func:`lsq` on the codes ``[-Q_N, Q_P]`` given directly (e.g. a narrow ``[-127, 127]`` grid)."""
    if grad_scale is None:
        n = x.numel() // (x.shape[axis] if axis is not None else 1)
        grad_scale = 1.0 / math.sqrt(max(n, 1) * qp)
    return _LsqFn.apply(x, s, qn, qp, grad_scale, axis)


class LSQQuantizer(Quantizer):
    """LSQ quantizer. ``init`` (a weight tensor) sets the step at once; otherwise calibration does.

    Args:
        bits, signed: grid.
        per_channel: one step per slice along axis 0 (weights).
        activation: ``N`` of the gradient scale counts the features of one sample (batch dim excluded).
        init: tensor to initialise the step from (weights).
        grad_scale: apply ``g = 1/sqrt(N Q_P)`` (paper); False uses ``g = 1``.
        init_rule: ``paper`` (``2 mean|x| / sqrt(Q_P)``) or ``mse`` (weights: the MSE-optimal step).
    """

    def __init__(self, bits: int, signed: bool, per_channel: bool = False, activation: bool = True,
                 init: Tensor | None = None, grad_scale: bool = True, init_rule: str = "paper"):
        super().__init__(bits, signed)
        if init_rule not in ("paper", "mse"):
            raise ValueError(f"LSQ init={init_rule!r}: choose 'paper' or 'mse'")
        self.init_rule = init_rule
        self.qn, self.qp = lsq_range(bits, signed)
        self.axis = 0 if per_channel else None
        self.activation = activation
        self.use_grad_scale = grad_scale
        n_steps = init.shape[0] if (per_channel and init is not None) else 1
        self.step = nn.Parameter(torch.ones(n_steps) if per_channel else torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("calib_sum", torch.zeros(()))
        self.register_buffer("calib_count", torch.zeros((), dtype=torch.long))
        self._samples: list[Tensor] = []
        self._ready = False
        if init is not None:
            self.init_from(init)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "step"
        if key in state_dict and state_dict[key].shape != self.step.shape:
            self.step = nn.Parameter(torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """``s = 2 mean|x| / sqrt(Q_P)``, or the MSE-optimal step with ``init_rule="mse"`` (per channel along
        axis 0 when per-channel)."""
        if self.init_rule == "mse":
            s = mse_scale(x, -self.qn, self.qp, self.axis).clamp_min(EPS)
        else:
            a = x.detach().abs().float()
            m = a.reshape(a.shape[0], -1).mean(dim=1) if self.axis is not None else a.mean()
            s = (2 * m / math.sqrt(self.qp)).clamp_min(EPS)
        if s.shape != self.step.shape:
            self.step = nn.Parameter(s.to(self.step.device))
        else:
            self.step.copy_(s)
        self.initialized.fill_(True)

    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            if not self.is_initialized() or self.activation:
                check_finite(x)  # a NaN batch would make the step NaN, and every output after it
                with torch.no_grad():
                    self.calib_sum += x.detach().abs().float().mean()
                    self.calib_count += 1
                    if self.init_rule == "mse" and self.activation:
                        flat = x.detach().reshape(-1).float()
                        if flat.numel() > _SAMPLE:
                            flat = flat[torch.randint(0, flat.numel(), (_SAMPLE,), device=x.device)]
                        self._samples.append(flat)
            return x if self.activation else self._quant(x)
        if not self._ready:
            self._ready = self._require_initialized()  # checked once: no host sync per call afterwards
        return self._quant(x)

    def _quant(self, x: Tensor) -> Tensor:
        if self.use_grad_scale:
            n = x.numel() // (x.shape[0])  # per sample (activations) or per output channel (weights)
            if self.axis is None and not self.activation:
                n = x.numel()
            gscale = 1.0 / math.sqrt(max(n, 1) * self.qp)
        else:
            gscale = 1.0
        return _LsqFn.apply(x, self.step, self.qn, self.qp, gscale, self.axis)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self.activation and int(self.calib_count) > 0:
            if self._samples:
                s = mse_step_geometric(torch.cat(self._samples), self.qn, self.qp)
                self._samples = []
            else:
                s = 2 * (self.calib_sum / self.calib_count) / math.sqrt(self.qp)
            self.step.copy_(s.clamp_min(EPS).expand_as(self.step))
            self.initialized.fill_(True)
            self._ready = True

    def grid(self) -> Grid:
        s = self.step.detach().abs().clamp_min(EPS).clone()  # the forward uses |step|
        return Grid(bits=self.bits, signed=self.signed, scale=s, zero_point=torch.zeros_like(s, dtype=torch.int32),
                    axis=self.axis, qmin=-self.qn, qmax=self.qp)

    def extra_repr(self) -> str:
        ch = "per-channel" if self.axis is not None else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {ch}, grad_scale={self.use_grad_scale}"


__all__ = ["LSQQuantizer", "lsq", "lsq_codes", "lsq_range"]

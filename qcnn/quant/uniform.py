"""Uniform affine quantization (Jacob et al., arXiv 1712.05877; FQN, CVPR 2019).

Forward   ``x_q = s * (clamp(round(x / s) + z, q_min, q_max) - z)``
Backward  ``dx_q/dx = 1`` where ``q_min <= round(x/s) + z <= q_max``, else 0 (masked STE, the rule of
          ``torch.fake_quantize_per_tensor_affine``, whose fused kernels are used here).

Parameters from a range ``[lo, hi]`` (extended to contain 0 so that zero is exact):

* symmetric, signed:    ``s = max(|lo|, |hi|) / (2^(B-1) - 1)``, ``z = 0``
* symmetric, unsigned:  ``s = hi / (2^B - 1)``, ``z = 0``
* asymmetric:           ``s = (hi - lo) / (q_max - q_min)``, ``z = clamp(q_min - round(lo / s))``
* power of two (``pot``): ``s`` rounded up to ``2^ceil(log2 s)``, i.e. a fixed-point QCode ``fl = -log2 s``.

``s`` is never below ``eps`` so a constant tensor gives a valid grid, never NaN.
Weights (``dynamic=True``) take their range from the tensor itself at every call: its min/max
(``weight_range="minmax"``, Jacob et al.), or the clipping threshold ``t`` that minimises the quantization
error ``sum (w - Q_t(w))^2`` over ``t = max|w| k / K``, ``k = 1..K`` (``weight_range="mse"``, :func:`mse_scale`;
per channel when per-channel); :meth:`UniformQuantizer.freeze` keeps the current grid instead (weights already
rounded onto it, e.g. by AdaRound). At 2 bits min/max puts ``s = max|w|``, so every weight below ``max|w| / 2`` is
zero (about 90 % of a ResNet-20's); the MSE threshold keeps the grid where the weights are. activations take it
from an observer (see :mod:`qcnn.calib`) during calibration. With ``track_in_training`` the range keeps
following the data during QAT as an exponential moving average of the batch min/max, starting from the
calibrated range: ``r <- m r + (1 - m) r_batch`` with ``m = track_momentum`` (0.99, torch.ao's
moving-average observer; an ``ema`` observer goes on with its own ``gamma``, FQN's 0.999). ``r_batch`` is
the batch's min/max, or, when calibration used the ``mse`` estimator, the batch's own MSE-optimal range
(:func:`mse_range`, on a fixed-size sample of the batch: the EMA of per-batch MSE ranges of MQBench's
``EMAMSEObserver``), so that an MSE-calibrated range is not pulled back to the outliers' max during
training. Whatever the estimator, training never keeps a running max, so one bad range at the start is
forgotten within a few hundred steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.calib.observers import EMAObserver, check_finite, make_observer, reduce_minmax
from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, _tracing, qrange

EPS = 1e-8


def pot_ceil(scale: Tensor) -> Tensor:
    """``2^ceil(log2 s)``: the power-of-two scale (fixed-point ``fl = -log2 s``) covering ``s``."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def qparams_from_range(
    lo: Tensor, hi: Tensor, bits: int, signed: bool, symmetric: bool, pot: bool = False, narrow: bool = False
) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of the grid that covers ``[lo, hi]`` (tensors, per tensor or per channel)."""
    qmin, qmax = qrange(bits, signed, narrow)
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi) if signed else hi
        scale = amax / qmax
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.clamp(scale, min=EPS)
    if pot:
        scale = pot_ceil(scale)
    if not symmetric:
        zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def fake_quant_reference(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                         axis: int | None) -> Tensor:
    """The fused kernels' rule in elementwise ops, computed in ``x``'s dtype: codes ``clamp(round(x *
    fl32(1/s)) + z)`` with the kernels' float32 reciprocal of the scale, dequantized as ``(q - z) s``. In
    float64 this is the exact simulation of the float32 kernels (which round that product to float32); in
    float32 it is the kernels' own arithmetic, used under torch.export / torch.compile (torch's fused kernels
    have no shape function for dynamic shapes). Same masked straight-through gradient."""
    shape = [1] * x.dim()
    if scale.dim() > 0 and axis is not None and scale.numel() > 1:
        shape[axis] = -1
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    s32 = scale.detach().to(torch.float32)
    inv = (1.0 / s32).to(dtype).reshape(shape)
    zp = zero_point.detach().to(dtype).reshape(shape if zero_point.numel() > 1 else [1] * x.dim())
    v = torch.round(x.detach().to(dtype) * inv) + zp
    keep = (v >= qmin) & (v <= qmax)
    y = (torch.clamp(v, qmin, qmax) - zp) * s32.to(dtype).reshape(shape)
    return (y + (x - x.detach()) * keep).to(x.dtype)


fake_quant_float64 = fake_quant_reference  #: the float64 simulation of the fused kernels (same function)


def _fq_forward(x: Tensor, inv: Tensor, s: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x * inv) + z, q_min, q_max) - z) s`` in float32 (``inv = fl32(1/s)``): the fused kernel."""
    v = torch.round(x.float() * inv) + zp
    return ((torch.clamp(v, qmin, qmax) - zp) * s).to(x.dtype)


def _fq_backward(g: Tensor, x: Tensor, inv: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """The masked straight-through gradient ``g [q_min <= round(x * inv) + z <= q_max]``, mask recomputed."""
    v = torch.round(x.float() * inv) + zp
    return torch.where((v >= qmin) & (v <= qmax), g, torch.zeros_like(g))


class _FakeQuantFn(torch.autograd.Function):
    """Fake quantization through :mod:`qcnn.quant.kernels`: saves ``x`` (not a mask), one pass each way."""

    @staticmethod
    def forward(ctx, x, inv, s, zp, qmin: int, qmax: int):
        ctx.save_for_backward(x, inv, zp)
        ctx.qrange = (qmin, qmax)
        return kernels.call(_fq_forward, x, inv, s, zp, qmin, qmax)

    @staticmethod
    def backward(ctx, g):
        x, inv, zp = ctx.saved_tensors
        return kernels.call(_fq_backward, g.contiguous(), x, inv, zp, *ctx.qrange), None, None, None, None, None


def _fake_quant_fused(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      axis: int | None) -> Tensor:
    s = kernels.bcast(scale.detach().to(torch.float32), x.dim(), axis)
    inv = 1.0 / s
    zp = kernels.bcast(zero_point.detach().to(torch.float32), x.dim(), axis)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return kernels.call(_fq_forward, x, inv, s, zp, qmin, qmax)
    return _FakeQuantFn.apply(x, inv, s, zp, qmin, qmax)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None) -> Tensor:
    """Fake-quantize with torch's fused kernels (per tensor when ``scale`` is 0-d, else per channel), or with
    qcnn's compiled kernel (:mod:`qcnn.quant.kernels`, same values bit for bit) when fused kernels are on;
    float64 tensors, and any tensor under torch.export / torch.compile, take :func:`fake_quant_reference`."""
    if x.dtype == torch.float64 or _tracing():
        return fake_quant_reference(x, scale, zero_point, qmin, qmax, axis)
    if kernels.fused_for(x):
        return _fake_quant_fused(x, scale, zero_point, qmin, qmax, axis)
    if scale.dim() == 0 or axis is None:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1).to(torch.int32), qmin, qmax
        )
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis, qmin, qmax)


@torch.no_grad()
def mse_scale(x: Tensor, qmin: int, qmax: int, axis: int | None = None, n_grid: int = 64) -> Tensor:
    """Scale ``s = t / qmax`` of the zero-centred grid ``s [qmin, qmax]`` whose threshold ``t`` among
    ``max|x| k / n_grid`` (``k = 1..n_grid``) minimises ``sum (x - s clamp(round(x / s), qmin, qmax))^2``, per
    slice along ``axis`` (0-d when ``axis`` is None). ``k = n_grid`` is the min/max scale of a symmetric grid;
    ties keep the smaller threshold."""
    flat = x.detach().float().reshape(1, -1) if axis is None else x.detach().float().transpose(0, axis).flatten(1)
    amax = flat.abs().amax(dim=1).clamp_min(EPS)  # [C]
    ratios = torch.arange(1, n_grid + 1, device=x.device, dtype=torch.float32) / n_grid  # [K]
    scales = (ratios[:, None] * amax[None, :]) / qmax  # [K, C]
    q = torch.clamp(torch.round(flat[None] / scales[..., None]), qmin, qmax) * scales[..., None]
    err = (q - flat[None]).pow(2).sum(dim=2)  # [K, C]
    best = scales.gather(0, err.argmin(dim=0, keepdim=True))[0]
    return best[0] if axis is None else best


#: elements of a batch the per-batch MSE range is computed on
MSE_SAMPLE = 1 << 16


@torch.no_grad()
def mse_range(x: Tensor, bits: int, signed: bool, symmetric: bool, n_grid: int = 32,
              sample: int = MSE_SAMPLE) -> tuple[Tensor, Tensor]:
    """The range ``r [lo, hi]`` (``lo, hi`` = the min/max of ``x``, ``r = k / n_grid``) whose grid
    (:func:`qparams_from_range`) minimises the squared quantization error of ``x``, per tensor, on an evenly
    strided sample of at most ``sample`` elements (deterministic). Ties keep the smaller range."""
    flat = x.detach().float().reshape(-1)
    if flat.numel() > sample:
        flat = flat[:: flat.numel() // sample][:sample]
    lo, hi = torch.clamp(flat.min(), max=0.0), torch.clamp(flat.max(), min=0.0)
    ratios = torch.arange(1, n_grid + 1, device=x.device, dtype=torch.float32) / n_grid
    qmin, qmax = qrange(bits, signed)
    scale, zp = qparams_from_range(lo * ratios, hi * ratios, bits, signed, symmetric)  # [K]
    q = (torch.clamp(torch.round(flat[None] / scale[:, None]) + zp[:, None], qmin, qmax) - zp[:, None]) * scale[:, None]
    best = (q - flat[None]).pow(2).sum(dim=1).argmin()  # a tensor index: no host sync in the training step
    return lo * ratios[best], hi * ratios[best]


class _RangeTracker(EMAObserver):
    """EMA of batch ranges during training, seeded with the calibrated range (:meth:`seed`).

    Its buffers are part of the quantizer's state (exact resume); a state saved without them loads, and
    the tracker is then seeded from the quantizer's current grid at the first training step.
    """

    @torch.no_grad()
    def seed(self, lo: Tensor, hi: Tensor) -> None:
        self.min_val, self.max_val = lo.detach().float().clone(), hi.detach().float().clone()
        self.count.fill_(1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not any(k.startswith(prefix) for k in state_dict):  # saved before trackers existed: not an error
            missing_keys[:] = [k for k in missing_keys if not k.startswith(prefix)]
            self.count.zero_()
            self.min_val, self.max_val = torch.zeros(0), torch.zeros(0)


class UniformQuantizer(Quantizer):
    """Uniform affine quantizer (see module docstring).

    Args:
        bits: grid bits (1..16).
        signed: signed codes ``[-2^(B-1), 2^(B-1)-1]`` or unsigned ``[0, 2^B - 1]``.
        symmetric: zero point fixed at 0.
        per_channel: one scale per slice along ``axis`` (0 = conv/linear output channels).
        observer: range estimator name (``minmax``, ``ema``, ``percentile``, ``mse``, ``kl``).
        dynamic: take the range from the input at every call (weights); no calibration needed.
        track_in_training: keep the range up to date in training mode (EMA of the batch ranges in QAT).
        track_momentum: the EMA's momentum ``m`` when the observer is not itself an EMA.
        pot: power-of-two scale (fixed-point QCode).
        narrow: drop the most negative signed code (symmetric int8 as in TensorRT/ONNX weight ranges).
        weight_range: with ``dynamic``, ``minmax`` (the tensor's range) or ``mse`` (the MSE-optimal symmetric
            threshold, :func:`mse_scale`; symmetric grids only).
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = True,
        symmetric: bool = True,
        per_channel: bool = False,
        axis: int = 0,
        observer: str = "minmax",
        dynamic: bool = False,
        track_in_training: bool = False,
        pot: bool = False,
        narrow: bool = False,
        track_momentum: float = 0.99,
        weight_range: str = "minmax",
        **observer_kwargs,
    ):
        super().__init__(bits, signed)
        if weight_range not in ("minmax", "mse"):
            raise ValueError(f"weight_range={weight_range!r}: choose 'minmax' or 'mse'")
        if weight_range == "mse" and not (dynamic and symmetric):
            raise ValueError("weight_range='mse' needs a dynamic symmetric grid (weights)")
        self.weight_range = weight_range
        if signed and symmetric and bits < 2:
            raise ValueError(f"bits={bits} is not supported by a signed symmetric uniform grid (codes {{-1, 0}}): "
                             "use bits >= 2, or a binary method (dorefa, bireal, hwgq) for 1-bit weights")
        self.symmetric = symmetric
        self.per_channel = per_channel
        self.axis = axis if per_channel else None
        self.dynamic = dynamic
        self.track_in_training = track_in_training
        self.pot = pot
        self.narrow = narrow
        self.qmin, self.qmax = qrange(bits, signed, narrow)
        self.observer = None if dynamic else make_observer(observer, axis=self.axis, **observer_kwargs)
        #: training-time range: the observer itself when it is an EMA, else an EMA seeded with its range
        self.tracker = None
        if track_in_training and self.observer is not None and not isinstance(self.observer, EMAObserver):
            self.tracker = _RangeTracker(axis=self.axis, gamma=track_momentum)
        #: the training tracker averages per-batch MSE ranges (per-tensor, calibrated with ``mse``)
        self.track_mse = self.tracker is not None and observer == "mse" and self.axis is None
        self._tracker_checked = False  # whether the tracker's seeding was checked (once, not every step)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(bool(dynamic)))
        self._ready = bool(dynamic)
        #: a frozen dynamic quantizer keeps its current scale / zero point (:meth:`freeze`)
        self.register_buffer("frozen", torch.tensor(False))
        self._frozen = False  # host copy of ``frozen``: no device read per call

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for k in ("scale", "zero_point"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "frozen" not in state_dict:  # saved before ``frozen`` existed: not frozen, not an error
            missing_keys[:] = [k for k in missing_keys if k != prefix + "frozen"]
            self.frozen.fill_(False)
        self._frozen = bool(self.frozen)
        self._tracker_checked = False

    @torch.no_grad()
    def freeze(self) -> None:
        """Keep the current ``scale`` / ``zero_point``: a dynamic quantizer stops recomputing them from its
        input (e.g. weights already rounded onto this grid by AdaRound). Saved in the state_dict."""
        self.frozen.fill_(True)
        self._frozen = True

    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def _set_qparams(self, lo: Tensor, hi: Tensor) -> None:
        self.scale, self.zero_point = qparams_from_range(
            lo, hi, self.bits, self.signed, self.symmetric, self.pot, self.narrow
        )

    def finish_calibration(self) -> None:
        if self.observer is not None and self.observer.is_initialized():
            lo, hi = self.observer.compute_range(self.bits, self.signed)
            self._set_qparams(lo, hi)
            self.initialized.fill_(True)
            if self.tracker is not None:
                self.tracker.seed(lo, hi)
                self._tracker_checked = True

    def _implied_range(self) -> tuple[Tensor, Tensor]:
        """The real interval the current (scale, zero point) covers."""
        z = self.zero_point.float()
        return (self.qmin - z) * self.scale, (self.qmax - z) * self.scale

    def _track(self, x: Tensor) -> None:
        obs = self.tracker if self.tracker is not None else self.observer
        if self.tracker is not None and not self._tracker_checked:  # one host sync, at the first step
            if not self.tracker.is_initialized() and bool(self.initialized):
                self.tracker.seed(*self._implied_range())  # a calibrated state saved before trackers existed
            self._tracker_checked = True
        if self.track_mse:
            obs.update_range(*mse_range(x, self.bits, self.signed, self.symmetric))
        else:
            obs.update(x)
        self._set_qparams(*obs.current_range())  # an EMA min/max observer: no check, no host read per step
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic and not self._frozen:
            with torch.no_grad():
                if self.weight_range == "mse":
                    s = mse_scale(x, self.qmin, self.qmax, self.axis)
                    self.scale = pot_ceil(s) if self.pot else s
                    self.zero_point = torch.zeros_like(self.scale, dtype=torch.int32)
                else:
                    self._set_qparams(*reduce_minmax(x, self.axis))
        elif self.observing:

            check_finite(x)
            self.observer.update(x)
            return x
        elif self.training and self.track_in_training:
            with torch.no_grad():
                self._track(x)
        elif not self._ready:
            self._ready = self._require_initialized()  # checked once, so no host sync per call afterwards
        return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def grid(self) -> Grid:
        fl = -torch.log2(self.scale).round().to(torch.int32) if self.pot else None
        return Grid(
            bits=self.bits,
            signed=self.signed,
            scale=self.scale.detach().clone(),
            zero_point=self.zero_point.detach().clone(),
            axis=self.axis,
            qmin=self.qmin,
            qmax=self.qmax,
            fl=fl,
        )

    def extra_repr(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        ch = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        src = f"dynamic {self.weight_range}" if self.dynamic else (self.observer.name if self.observer else "")
        return f"bits={self.bits}, signed={self.signed}, {kind}, {ch}, range={src}, pot={self.pot}"

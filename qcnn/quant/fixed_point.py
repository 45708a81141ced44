"""Dynamic fixed point ("QCode"): fixed-point truncation without retraining (Gysel et al., Ristretto,
arXiv 1605.06402 / 1604.03168; the survey's "QCode" section).

Forward   ``x_q = clip(round(x * 2^fl), -2^(B-1), 2^(B-1) - 1) / 2^fl``  (signed, the paper's form)
          ``x_q = clip(round(x * 2^fl), 0, 2^B - 1) / 2^fl``              (unsigned variant, option)
Backward  ``dx_q/dx = 1`` where the code is inside the clip range, else 0 (masked straight-through
          estimator, the rule of ``torch.fake_quantize_per_tensor_affine`` whose kernel is used).

``fl`` (fractional length) is an integer, possibly negative, stored as an int32 buffer; the grid's scale
is ``2^-fl``, zero point 0. Every quantized layer has one QCode for its weights and one for the
activation it consumes. The initial ``fl`` comes from a range: ``fl = B - 1 - ceil(log2 max|x|)``
(``B - ceil(log2 max|x|)`` unsigned), where the range is the weight tensor's own (``weight_calib``,
default ``minmax``) or the calibration observer's for activations (``minmax``, ``ema``, ``percentile``,
``mse``, ``kl``). :mod:`qcnn.methods.ptq` then refines each ``fl`` (window search on MSE/KL) and the bit
widths (accuracy-aware search). Per-channel weight QCodes (one ``fl`` per output channel) are allowed.
"""

from __future__ import annotations

import torch
from torch import Tensor

import qcnn.calib.histogram  # noqa: F401 - registers the percentile / mse / kl observers
from qcnn.calib.histogram import initial_fl
from qcnn.calib.observers import check_finite, make_observer, reduce_minmax
from qcnn.quant.base import Grid, Quantizer, check_bits, qrange
from qcnn.quant.uniform import fake_quant

#: fl is kept inside this range (a constant-zero tensor would otherwise ask for an infinite fl)
FL_MIN, FL_MAX = -32, 40


def fl_from_amax(amax: Tensor, bits: int, signed: bool) -> Tensor:
    """Vectorised ``B - 1 - ceil(log2 amax)`` (int32), clamped to ``[FL_MIN, FL_MAX]``; no NaN for 0."""
    amax = amax.float().clamp(min=2.0**-30)
    fl = (bits - 1 if signed else bits) - torch.ceil(torch.log2(amax))
    return fl.clamp(FL_MIN, FL_MAX).to(torch.int32)


def fixed_point_quant(x: Tensor, fl: Tensor, qmin: int, qmax: int, axis: int | None = None) -> Tensor:
    """``clip(round(x 2^fl), qmin, qmax) 2^-fl`` with the masked straight-through gradient."""
    scale = torch.exp2(-fl.float())
    zp = torch.zeros(() if fl.dim() == 0 or axis is None else fl.numel(), dtype=torch.int32, device=x.device)
    return fake_quant(x, scale, zp, qmin, qmax, axis)


class FixedPointQuantizer(Quantizer):
    """QCode quantizer with an integer fractional length ``fl`` (see module docstring).

    Args:
        bits: word length B (1..16).
        signed: codes ``[-2^(B-1), 2^(B-1)-1]`` (the paper) or ``[0, 2^B-1]``.
        fl: fixed fractional length; None = set by calibration (or, with ``init_from_input``, from the
            first tensor seen, the way weights get theirs).
        observer: range estimator used in calibration mode.
        per_channel / axis: one fl per slice along ``axis`` (weights only; minmax ranges).
        init_from_input: if still uncalibrated at the first forward, take ``fl`` from that tensor's
            max|x| (weights: their QCode needs no data).
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool = True,
        fl: int | None = None,
        observer: str = "minmax",
        per_channel: bool = False,
        axis: int = 0,
        init_from_input: bool = False,
        **observer_kwargs,
    ):
        super().__init__(bits, signed)
        if signed and bits < 2:
            raise ValueError(f"bits={bits} is not supported by a signed QCode (codes {{-1, 0}}: every positive "
                             "value would become 0); use bits >= 2, or a binary method (dorefa, bireal, hwgq)")
        self.per_channel = per_channel
        self.axis = axis if per_channel else None
        self.init_from_input = init_from_input
        self.qmin, self.qmax = qrange(self.bits, self.signed)
        self.observer = make_observer(observer, axis=self.axis, **observer_kwargs)
        self.register_buffer("fl", torch.tensor(0 if fl is None else int(fl), dtype=torch.int32))
        self.register_buffer("initialized", torch.tensor(fl is not None))
        self._ready = fl is not None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "fl" in state_dict:
            self.fl = torch.empty_like(state_dict[prefix + "fl"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = False  # re-check once: the loaded state may be uncalibrated

    def set_bits(self, bits: int) -> None:
        """Change the word length (keeps ``fl``; callers re-choose it)."""
        self.bits = check_bits(bits)
        self.qmin, self.qmax = qrange(self.bits, self.signed)

    @torch.no_grad()
    def set_fl(self, fl: int | Tensor) -> None:
        fl = torch.as_tensor(fl, dtype=torch.int32, device=self.fl.device)
        if fl.numel() == 1 and self.axis is None:
            fl = fl.reshape(())
        self.fl = fl.clamp(FL_MIN, FL_MAX).to(torch.int32)
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def fl_from_range(self, lo: Tensor, hi: Tensor) -> Tensor:
        amax = torch.maximum(lo.abs(), hi.abs()) if self.signed else hi.clamp(min=0)
        return fl_from_amax(amax, self.bits, self.signed)

    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def finish_calibration(self) -> None:
        if self.observer.is_initialized():
            self.set_fl(self.fl_from_range(*self.observer.compute_range(self.bits, self.signed)))

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            check_finite(x)
            self.observer.update(x)
            return x
        if not self._ready:
            if self.init_from_input and not self.is_initialized():
                self.set_fl(self.fl_from_range(*reduce_minmax(x, self.axis)))
            self._ready = self._require_initialized()  # checked once, so no host sync per call afterwards
        return fixed_point_quant(x, self.fl, self.qmin, self.qmax, self.axis)

    @property
    def scale(self) -> Tensor:
        return torch.exp2(-self.fl.float())

    def grid(self) -> Grid:
        return Grid(
            bits=self.bits,
            signed=self.signed,
            scale=self.scale.detach().clone(),
            zero_point=torch.zeros_like(self.fl),
            axis=self.axis,
            qmin=self.qmin,
            qmax=self.qmax,
            fl=self.fl.detach().clone(),
        )

    def extra_repr(self) -> str:
        ch = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, signed={self.signed}, {ch}, range={self.observer.name}"


def qcode_fl(x: Tensor, bits: int, signed: bool = True) -> int:
    """The initial fl of a tensor (host value, for reports and tests)."""
    amax = float(x.detach().abs().max()) if signed else float(x.detach().clamp(min=0).max())
    return max(FL_MIN, min(FL_MAX, initial_fl(amax, bits, signed)))


__all__ = ["FL_MAX", "FL_MIN", "FixedPointQuantizer", "fixed_point_quant", "fl_from_amax", "qcode_fl"]

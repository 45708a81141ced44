"""ELQ: explicit loss-error-aware quantization (Zhou, Moosavi-Dezfooli, Cheung, Frossard, CVPR 2018).

Weights only (activations stay float), binary or ternary, ``W_q = alpha T`` per layer.

Closed-form scale and threshold (TWN-like, Li & Liu 2016)::

    ternary (2 bits):  delta = 0.7 mean|W|;  T = sign(W) 1{|W| > delta};  alpha = mean(|W| : |W| > delta)
    binary  (1 bit):   T = sign(W) (sign(0) = +1);                          alpha = mean|W|

Incremental quantization: the layer's ``delta`` and ``alpha`` are computed once, from the weights when
quantization starts (:meth:`ELQWeightQuantizer.init_scale`), and then kept, so a weight that has been
quantized stays exactly where it was put. A growing fraction of each layer's weights is *frozen* at its
quantized value ``alpha T`` (:meth:`ELQWeightQuantizer.freeze_fraction`), chosen by importance:

* ``loss`` (default, loss-aware): the first-order loss change of quantizing weight i, ``|g_i (W_i - W_q,i)|``
  with ``g`` the running mean of the gradient (updated after every step by the procedure); the weights whose
  quantization changes the loss least are frozen first;
* ``error``: the quantization error ``|W_i - W_q,i|`` (smallest first).

Forward ``y = where(frozen, alpha T, W)``: frozen entries are the quantized value, free ones float.
Backward: identity for the free weights, 0 for the frozen ones (their gradient is masked, and the procedure
restores them after every step so that weight decay and momentum cannot move them either). When every
weight is frozen the layer is exactly ``alpha T``.

The training objective (:func:`qcnn.methods.elq.elq_penalty`) is ``loss + lambda sum_layers ||W - W_q||^2``
over the free weights (``W_q = alpha T(W)``, no gradient through ``W_q``), which pulls the free weights towards the grid
so that freezing them later changes the loss little (the paper's explicit quantization-error term).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qcnn.quant import kernels
from qcnn.quant.base import Grid, Quantizer, binary_sign, check_bits

CRITERIA = ("loss", "error")


def ternary_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, delta) of TWN: ``delta = 0.7 mean|W|``, ``alpha = mean(|W| : |W| > delta)`` (0 if none)."""
    a = w.abs()
    delta = 0.7 * a.mean()
    mask = (a > delta).to(w.dtype)
    alpha = (a * mask).sum() / mask.sum().clamp(min=1.0)
    return alpha, delta


def binary_params(w: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, delta) of the binary case: ``alpha = mean|W|``, ``delta = 0`` (unused)."""
    return w.abs().mean(), torch.zeros((), dtype=w.dtype, device=w.device)


def codes(w: Tensor, delta: Tensor, bits: int) -> Tensor:
    """T: ``sign(W)`` (1 bit) or ``sign(W) 1{|W| > delta}`` (2 bits)."""
    if bits == 1:
        return binary_sign(w)
    return torch.sign(w) * (w.abs() > delta).to(w.dtype)


def _elq_forward(w: Tensor, frozen: Tensor, frozen_codes: Tensor, alpha: Tensor) -> Tensor:
    """``where(frozen, alpha T, W)``, ``alpha T`` made from the int8 codes inside the kernel."""
    return torch.where(frozen, alpha * frozen_codes.to(w.dtype), w)


def _elq_backward(g: Tensor, frozen: Tensor) -> Tensor:
    """Identity for the free weights, 0 for the frozen ones."""
    return g.masked_fill(frozen, 0.0)


class _ELQFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, frozen, frozen_codes, alpha):
        ctx.save_for_backward(frozen)
        return kernels.call(_elq_forward, w, frozen, frozen_codes, alpha)

    @staticmethod
    def backward(ctx, g):
        (frozen,) = ctx.saved_tensors
        return kernels.call(_elq_backward, g.contiguous(), frozen), None, None, None


class ELQWeightQuantizer(Quantizer):
    """Binary (``bits=1``) or ternary (``bits=2``) ELQ weight quantizer with a frozen mask (module docstring)."""

    def __init__(self, bits: int = 2, criterion: str = "loss"):
        super().__init__(check_bits(bits, "w_bits", 1, 2), signed=True)
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is not one of {CRITERIA}")
        self.criterion = criterion
        self.register_buffer("alpha", torch.zeros(()))
        self.register_buffer("delta", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("frozen", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("frozen_codes", torch.zeros(0, dtype=torch.int8))
        self.register_buffer("grad_avg", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in ("frozen", "frozen_codes", "grad_avg"):
            if prefix + k in state_dict:
                setattr(self, k, torch.empty_like(state_dict[prefix + k]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def is_initialized(self) -> bool:
        return bool(self.initialized)

    @torch.no_grad()
    def init_scale(self, w: Tensor) -> None:
        """Fix ``alpha`` and ``delta`` from ``w`` (closed form) and reset the frozen mask."""
        alpha, delta = (binary_params if self.bits == 1 else ternary_params)(w.detach())
        self.alpha = alpha.detach().clone()
        self.delta = delta.detach().clone()
        self.frozen = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        self.frozen_codes = torch.zeros(w.shape, dtype=torch.int8, device=w.device)
        self.grad_avg = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
        self.initialized.fill_(True)

    def quantized(self, w: Tensor) -> Tensor:
        """``alpha T(w)`` with the layer's fixed alpha and delta."""
        return self.alpha * codes(w, self.delta, self.bits)

    def forward(self, w: Tensor) -> Tensor:
        if self.frozen.shape != w.shape:
            raise RuntimeError(
                f"ELQWeightQuantizer is used before init_scale (frozen mask {tuple(self.frozen.shape)} vs weight "
                f"{tuple(w.shape)}): the elq procedure (or qcnn.methods.elq.elq_start) initialises it"
            )
        return _ELQFn.apply(w, self.frozen, self.frozen_codes, self.alpha)

    @torch.no_grad()
    def update_grad(self, g: Tensor, momentum: float = 0.9) -> None:
        """Running mean of the weight gradient (for the ``loss`` criterion)."""
        self.grad_avg.mul_(momentum).add_(g, alpha=1.0 - momentum)

    @torch.no_grad()
    def importance(self, w: Tensor) -> Tensor:
        """Estimated cost of quantizing each weight (lower = frozen earlier)."""
        err = (w - self.quantized(w)).abs()
        if self.criterion == "error":
            return err
        # loss-aware, ties (e.g. zero gradient) broken by the quantization error
        return (self.grad_avg * err).abs() + 1e-12 * err

    @torch.no_grad()
    def freeze_fraction(self, w: Tensor, fraction: float) -> int:
        """Freeze the least important free weights until ``fraction`` of the layer is frozen.

        Newly frozen entries get ``T(w)`` and ``w`` is set to ``alpha T`` there. Returns the number frozen now.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction={fraction!r} must be in [0, 1]")
        n = w.numel()
        target = int(round(fraction * n))
        have = int(self.frozen.sum())
        new = target - have
        if new <= 0:
            return 0
        score = self.importance(w).flatten().clone()
        score[self.frozen.flatten()] = float("inf")
        idx = torch.topk(score, new, largest=False).indices
        mask = torch.zeros(n, dtype=torch.bool, device=w.device)
        mask[idx] = True
        mask = mask.view_as(w)
        t = codes(w, self.delta, self.bits).to(torch.int8)
        self.frozen_codes = torch.where(mask, t, self.frozen_codes)
        self.frozen |= mask
        self.restore(w)
        return new

    @torch.no_grad()
    def restore(self, w: Tensor) -> None:
        """Put the frozen weights back to ``alpha T`` (in the stored parameter)."""
        w.copy_(torch.where(self.frozen, self.alpha * self.frozen_codes.to(w.dtype), w))

    def frozen_fraction(self) -> float:
        return float(self.frozen.float().mean()) if self.frozen.numel() else 0.0

    def grid(self) -> Grid:
        if self.bits == 1:
            return Grid(bits=1, signed=True, scale=self.alpha.detach().clone(),
                        zero_point=torch.zeros((), dtype=torch.int32), qmin=-1, qmax=1,
                        int_levels=torch.tensor([-1, 1]))
        return Grid(bits=2, signed=True, scale=self.alpha.detach().clone(),
                    zero_point=torch.zeros((), dtype=torch.int32), qmin=-1, qmax=1)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, criterion={self.criterion}"


__all__ = ["CRITERIA", "ELQWeightQuantizer", "binary_params", "codes", "ternary_params"]

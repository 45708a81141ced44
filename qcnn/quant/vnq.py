"""VNQ: variational network quantization (Achterhold, Koehler, Schmeink, Genewein; ICLR 2018).

Posterior: every weight is Gaussian, ``w ~ N(theta, sigma^2)``, with ``theta`` the layer's ``weight`` and
``log sigma^2`` a parameter of the same shape (held by :class:`VNQQuantizer`).

Prior: a mixture of shifted log-uniform "spikes" at the ternary codebook ``c in {-r, 0, r}``, one ``r``
per layer. ``r`` is a learned parameter, initialised from the pretrained weights with the ternary rule
``delta = 0.7 mean|w|``, ``r = mean(|w| : |w| > delta)``; its gradient comes from the KL term.

KL (per weight, approximated with the mode nearest to ``theta``; the sparse variational dropout fit of
Molchanov et al. 2017)::

    c* = argmin_c |theta - c|          (no gradient through the choice)
    log alpha = log sigma^2 - log((theta - c*)^2)
    -KL ~ k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha),  k1=0.63576, k2=1.87320, k3=1.48695
    KL  ~ k1 - (-KL)  >= 0, -> 0 as alpha -> inf        (the constant -k1 makes it a non-negative loss)

``log alpha`` is clamped to [-10, 10] inside the KL, as in the sparse-VD reference code.

Forward (training, local reparameterisation trick, in :class:`VNQConv2d` / :class:`VNQLinear`)::

    mu  = op(x, theta) + b,   var = op(x^2, sigma^2),   y = mu + sqrt(var + 1e-8) * eps,  eps ~ N(0, 1)

Backward: ordinary autograd through that expression (reparameterisation), for ``theta`` and
``log sigma^2``. Evaluation uses the mean weights ``theta`` (the quantizer is the identity).

Objective (ELBO, :mod:`qcnn.methods.vnq`): ``CE + beta(t) * sum KL / N`` with ``N`` training images and
``beta`` warmed up linearly from 0 to 1.

Option ``clip_theta`` (a training detail to check against the paper, off by default): after every optimizer
step the means are clipped to ``[-r, r]``. The multi-spike KL pulls a weight far outside the codebook only
weakly (its gradient falls as ``1/|theta - c*|``), so without the clip the few large weights of a pretrained
layer stay large and lose most in the snap to ``r``; with it they sit on ``+-r`` already.

After training (no fine-tuning): a weight whose ``log alpha`` relative to zero, ``log sigma^2 -
log theta^2``, exceeds a threshold (2 by default) becomes 0; every other weight snaps to the nearest of
``{-r, 0, r}``. The layer is then ternary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qcnn.quant.base import Grid, Quantizer

K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLAMP = 10.0
EPS = 1e-8


def neg_kl(log_alpha: Tensor) -> Tensor:
    """``k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha)`` (the approximation of -KL)."""
    return K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha)


def ternary_r(w: Tensor) -> Tensor:
    """Initial codebook value: ``mean(|w| : |w| > 0.7 mean|w|)`` (``mean|w|`` if nothing is above)."""
    a = w.detach().abs().reshape(-1).float()
    delta = 0.7 * a.mean()
    big = (a > delta).float()
    return torch.where(big.sum() > 0, (a * big).sum() / big.sum().clamp_min(1.0), a.mean()).clamp_min(EPS)


class VNQQuantizer(Quantizer):
    """Variational state of one layer (``log sigma^2``, ``r``) and its ternary codebook ``{-r, 0, r}``.

    ``forward`` is the identity (mean weights); the noise is added by the layer in training.
    """

    def __init__(self, weight: Tensor, log_sigma2_init: float = -8.0, learn_r: bool = True):
        super().__init__(2, signed=True)
        self.log_sigma2 = nn.Parameter(torch.full_like(weight.detach(), float(log_sigma2_init)))
        r = ternary_r(weight)
        if learn_r:
            self.r = nn.Parameter(r)
        else:
            self.register_buffer("r", r)

    def forward(self, w: Tensor) -> Tensor:
        return w

    def levels(self) -> Tensor:
        r = self.r.abs()
        return torch.stack([-r, torch.zeros_like(r), r])

    def log_alpha(self, w: Tensor) -> Tensor:
        """``log sigma^2 - log (theta - c*)^2`` with ``c*`` the nearest codebook value."""
        lv = self.levels()
        idx = torch.argmin((w.detach().unsqueeze(-1) - lv.detach()).abs(), dim=-1)
        d = w - lv[idx]
        return self.log_sigma2 - torch.log(d * d + EPS)

    def kl(self, w: Tensor) -> Tensor:
        """Sum over the layer of ``k1 - (-KL)`` (non-negative)."""
        la = self.log_alpha(w).clamp(-LOG_ALPHA_CLAMP, LOG_ALPHA_CLAMP)
        return (K1 - neg_kl(la)).sum()

    @torch.no_grad()
    def snap(self, w: Tensor, threshold: float = 2.0) -> Tensor:
        """Pruned and ternarised copy of ``w``: 0 where ``log sigma^2 - log w^2 > threshold``, else the
        nearest of ``{-r, 0, r}``."""
        lv = self.levels().detach().to(w.dtype)
        la0 = self.log_sigma2 - torch.log(w * w + EPS)
        idx = torch.argmin((w.unsqueeze(-1) - lv).abs(), dim=-1)
        return torch.where(la0 > threshold, torch.zeros_like(w), lv[idx])

    def grid(self, w: Tensor | None = None) -> Grid:
        return Grid(bits=2, signed=True, levels=self.levels().detach().clone())

    def extra_repr(self) -> str:
        return f"ternary, r={float(self.r.abs()):.4g}"


__all__ = ["K1", "K2", "K3", "VNQQuantizer", "neg_kl", "ternary_r"]

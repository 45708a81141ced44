"""VNQ's training layers: ``QConv2d`` / ``QLinear`` with the local reparameterisation trick (Kingma et al.
2015): in training the output is sampled from ``N(x W_mu, x^2 sigma^2)``; in eval the mean weights are used.
The quantizer (multi-spike prior, KL) is :mod:`qcnn.quant.vnq`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.vnq import EPS


class _Variational:
    """Local reparameterisation forward for a layer whose ``weight_quant`` is a :class:`VNQQuantizer`."""

    def _noisy(self, x: Tensor, op) -> Tensor:
        x = self._pre(x)
        mu = op(x, self.weight, self.bias)
        var = op(x * x, torch.exp(self.weight_quant.log_sigma2), None)
        return self._post(mu + torch.sqrt(var + EPS) * torch.randn_like(mu))


class VNQConv2d(_Variational, QConv2d):
    """QConv2d with the local reparameterisation trick in training (mean weights in eval)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return self._noisy(x, self._conv_forward)


class VNQLinear(_Variational, QLinear):
    """QLinear with the local reparameterisation trick in training (mean weights in eval)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return self._noisy(x, F.linear)


__all__ = ["VNQConv2d", "VNQLinear"]

"""FQN: fully quantized network (Li et al., "Fully Quantized Network for Object Detection", CVPR 2019),
with the integer arithmetic and BatchNorm folding of Jacob et al. (arXiv 1712.05877).

Every layer is quantized, the first and last included (recipe ``first_last: same``), on uniform asymmetric
grids ``X^Q = Delta (X^I - z)``, ``Delta = (ub - lb) / (2^k - 1)``, ``z = q_min - round(lb / Delta)``:

* weights: per output channel, ``lb, ub = min W, max W`` of the (folded) weight at every step;
* activations (and residual sums): ``lb, ub`` = exponential moving average of the batch min / max,
  ``m <- gamma m + (1 - gamma) m_batch`` with ``gamma = 0.999``, updated during training
  (``UniformQuantizer(observer="ema", track_in_training=True)``).

Forward ``x_q = Delta (clamp(round(x / Delta) + z, q_min, q_max) - z)``; backward: straight-through inside
the grid range, zero outside (``dx_q/dx = 1[q_min <= round(x/Delta) + z <= q_max]``), as in
:mod:`qcnn.quant.uniform`. The ranges get no gradient (they are statistics).

BatchNorm folding with frozen statistics (:class:`QConvBn2d`)::

    sigma = sqrt(running_var + eps),   f = gamma / sigma
    y = conv(x_q, Q(W * f)) + (beta + (b - running_mean) * f)

The folded weight ``W f`` is what is quantized (it is what the integer engine multiplies), while the
parameters that are updated are the unfolded ``W``, ``gamma``, ``beta`` (and conv bias ``b``): gradients
reach them through ``W f`` (chain rule, STE through ``Q``). ``running_mean`` / ``running_var`` never
change (frozen as in the paper: they come from the pretrained float model). After training,
:func:`fold_conv_bn` turns every ``QConvBn2d`` into a plain ``QConv2d`` with weight ``W f`` and that bias,
which gives the same output and is what :mod:`qcnn.integer` compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qcnn.nn.layers import QConv2d
from qcnn.quant.registry import LayerContext, Method, register_method
from qcnn.quant.uniform import UniformQuantizer


@dataclass
class FQNOptions:
    #: EMA factor of the activation range estimator
    gamma: float = 0.999
    #: keep BatchNorm modules unfolded after ``quantize`` (the fqn procedure then trains them folded with
    #: frozen statistics through QConvBn2d); False folds BN into the convs with its eval statistics
    keep_bn: bool = False


@register_method
class FQNMethod(Method):
    """FQN quantizers: asymmetric per-channel min/max weights, asymmetric EMA activation ranges."""

    requires_quantized_activations = True
    name = "fqn"
    Options = FQNOptions

    def weight_quantizer(self, ctx: LayerContext) -> UniformQuantizer:
        return UniformQuantizer(ctx.w_bits, signed=True, symmetric=False, per_channel=ctx.per_channel,
                                dynamic=True)

    def calibrated_act(self, bits: int, signed: bool, calib: str) -> UniformQuantizer:
        return UniformQuantizer(bits, signed=signed, symmetric=False, observer="ema", track_in_training=True,
                                gamma=self.options.gamma)

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.options.keep_bn:
            return model
        from qcnn.transform import fold_bn

        return fold_bn(model)


class QConvBn2d(QConv2d):
    """QConv2d followed by a frozen BatchNorm2d, computed as one conv with the folded, quantized weight.

    Holds the conv parameters (``weight``, ``bias``) and the BatchNorm module ``bn`` (``gamma``, ``beta``
    trainable; running statistics frozen, used in training and evaluation alike).
    """

    bn: nn.BatchNorm2d

    @classmethod
    def from_qconv(cls, conv: QConv2d, bn: nn.BatchNorm2d) -> QConvBn2d:
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError("QConvBn2d needs a BatchNorm2d with running statistics (track_running_stats=True)")
        q = cls.from_float(conv, conv.input_quant, conv.weight_quant, conv.out_quant)
        q.bn = bn
        return q

    def folded(self) -> tuple[Tensor, Tensor]:
        """(folded weight ``W gamma / sigma``, folded bias ``beta + (b - mean) gamma / sigma``)."""
        bn = self.bn
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
        f = gamma / sigma
        b = self.bias if self.bias is not None else torch.zeros_like(sigma)
        return self.weight * f.reshape(-1, 1, 1, 1), beta + (b - bn.running_mean) * f

    def quantized_weight(self) -> Tensor:
        w, _ = self.folded()
        return self.weight_quant(w) if self.weight_quant is not None else w

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.folded()
        wq = self.weight_quant(w) if self.weight_quant is not None else w
        return self._post(F.conv2d(self._pre(x), wq, b, self.stride, self.padding, self.dilation, self.groups))

    def to_qconv(self) -> QConv2d:
        """A plain QConv2d with the folded weight and bias (same quantizers, same output)."""
        with torch.no_grad():
            w, b = self.folded()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        q = QConv2d.from_float(conv, self.input_quant, self.weight_quant, self.out_quant)
        return q.train(self.training)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def attach_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every ``QConv2d -> BatchNorm2d`` pair (the BN the conv's only user) by one :class:`QConvBn2d`
    (in place); the BN node leaves the graph and lives inside the new module."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and type(modules.get(src.target)) is QConv2d):
            continue
        _set_module(gm, src.target, QConvBn2d.from_qconv(modules[src.target], modules[node.target]))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def fold_conv_bn(model: nn.Module) -> nn.Module:
    """Turn every :class:`QConvBn2d` of ``model`` into a folded plain QConv2d (in place); returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QConvBn2d):
            _set_module(model, name, m.to_qconv())
    if isinstance(model, fx.GraphModule):
        model.recompile()
    return model


__all__ = ["FQNMethod", "FQNOptions", "QConvBn2d", "attach_bn", "fold_conv_bn"]

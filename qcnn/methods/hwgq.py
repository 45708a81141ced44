"""HWGQ's policy: half-wave Gaussian activations where the input is a ReLU of a normalised BatchNorm output,
binary per-channel weights, BatchNorm affine kept where the official code keeps it. The quantizers and
the level solver are :mod:`qcnn.quant.hwgq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcnn.methods.base import EdgeUniformMethod, LayerContext, Method, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.hwgq import KINDS, BinaryChannelWeight, HWGQActivation
from qcnn.transform import layers_in_order


@dataclass
class HWGQOptions:
    #: ``uniform`` ({0.538, 1.076, 1.614} at 2 bits) or ``lloyd`` (Lloyd-Max {0.318, 1.0, 1.894})
    levels: str = "uniform"
    #: log-tailed ReLU backward above the top level
    log_tail: bool = False
    #: ``auto``: BatchNorm affine off exactly where the BN output feeds a hidden layer's HWGQ quantizer (the
    #: official placement, module docstring); ``false``: off on every BN; ``true``: kept on every BN
    bn_affine: bool | str = "auto"
    #: EMA momentum of the scale ``s`` of quantizers whose input is not a normalised BN output
    scale_momentum: float = 0.1


#: operations between a BatchNorm and an HWGQ quantizer that keep the quantized values those of the BN output
_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_COMMUTING_MODULES = _RELU_MODULES + (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity)
_COMMUTING_FUNCS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.max_pool2d, torch.max_pool2d,
                    torch.flatten}
_COMMUTING_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "contiguous"}
_BN = nn.modules.batchnorm._BatchNorm


def _strip_affine(bn: nn.Module) -> None:
    if bn.affine:
        bn.affine = False
        bn.weight = None
        bn.bias = None


def normalized_inputs(model: nn.Module) -> dict[str, str]:
    """``{layer: batchnorm}`` for every Conv2d/Linear of ``model`` whose input is the output of a BatchNorm
    through operations that commute with the HWGQ quantizer (module docstring); ``{}`` if ``torch.fx``
    cannot trace the model. Graph order, as :func:`qcnn.methods.quantize` numbers the layers."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - quantize() warns and falls back to a module swap
        return {}
    modules = dict(gm.named_modules())

    def commutes(n: fx.Node) -> bool:
        if n.op == "call_module":
            return isinstance(modules[n.target], _COMMUTING_MODULES)
        if n.op == "call_function":
            return n.target in _COMMUTING_FUNCS
        return n.op == "call_method" and n.target in _COMMUTING_METHODS

    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        src = node.args[0] if node.args else None
        while isinstance(src, fx.Node):
            if src.op == "call_module" and isinstance(modules[src.target], _BN):
                out[node.target] = src.target
                break
            if not (commutes(src) and src.args):
                break
            src = src.args[0]
    return out


def quantizable_layers(model: nn.Module) -> list[str]:
    """Conv2d/Linear module names in ``torch.fx`` graph order (``[]`` if the model cannot be traced)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - quantize() warns and falls back to a module swap
        return []
    return [name for name, _ in layers_in_order(gm, gm)]


@register_method
class HWGQMethod(EdgeUniformMethod):
    """HWGQ activations (after ReLU), binary per-channel weights, BatchNorm affine as in the official code."""

    name = "hwgq"
    Options = HWGQOptions
    #: levels are solved for up to 8 bits (the paper prints 1 and 2)
    act_bits = tuple(range(1, 9))

    def __init__(self, options=None):
        super().__init__(options)
        if self.options.levels not in KINDS:
            raise ValueError(f"HWGQ levels={self.options.levels!r} is not one of {KINDS}")
        if self.options.bn_affine not in (True, False, "auto"):
            raise ValueError(f"HWGQ bn_affine={self.options.bn_affine!r} is not one of auto, true, false")
        #: layer name -> the BatchNorm module whose normalised output its HWGQ quantizer sees
        self._bn_of: dict[str, nn.Module] = {}

    def prepare(self, model: nn.Module) -> nn.Module:
        mode = self.options.bn_affine
        self._bn_of = {}
        if mode is True:
            return model
        if mode is False:
            for m in model.modules():
                if isinstance(m, _BN):
                    _strip_affine(m)
            self._bn_of = {n: model.get_submodule(b) for n, b in normalized_inputs(model).items()}
            return model
        # auto: hidden layers only (the classifier's BN keeps gamma/beta, as the official CIFAR VGG's bn3);
        # the BN is stripped when the layer's HWGQ quantizer is created (low_act), so a layer that stays
        # float (override skip) or gets another quantizer leaves its BN untouched
        order = quantizable_layers(model)
        hidden = set(order[1:-1])
        self._bn_of = {n: model.get_submodule(b) for n, b in normalized_inputs(model).items() if n in hidden}
        return model

    def low_weight(self, ctx: LayerContext) -> Quantizer:
        if ctx.w_bits == 1:
            return BinaryChannelWeight()
        return Method.weight_quantizer(self, ctx)

    def low_act(self, ctx: LayerContext) -> Quantizer:
        if ctx.input_signed:
            return self.calibrated_act(ctx.a_bits, True, ctx.calib)
        bn = self._bn_of.get(ctx.name)
        if bn is not None:
            _strip_affine(bn)  # no-op with bn_affine: false (already stripped)
        return HWGQActivation(ctx.a_bits, self.options.levels, self.options.log_tail, normalized=bn is not None,
                              momentum=self.options.scale_momentum)


__all__ = ["HWGQMethod", "HWGQOptions", "normalized_inputs", "quantizable_layers"]

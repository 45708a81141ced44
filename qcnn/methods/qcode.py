"""QCode's policy: per-layer dynamic fixed point (power-of-two scales) for weights, activations and residual
sums. The quantizer is :mod:`qcnn.quant.fixed_point`; the accuracy-aware and greedy QCode searches are
:mod:`qcnn.methods.ptq`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcnn.calib.observers import make_observer
from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.quant.base import Quantizer
from qcnn.quant.fixed_point import FixedPointQuantizer


@dataclass
class QCodeOptions:
    #: range estimator of the weight QCodes (activations use the recipe's ``calib``)
    weight_calib: str = "minmax"
    #: quantize activations after ReLU on the unsigned grid [0, 2^B - 1] (the paper keeps them signed)
    unsigned_acts: bool = False


class QCodeMethod(Method):
    """Per-layer dynamic fixed point for weights and activations (Ristretto-style QCode)."""

    name = "qcode"
    weight_bits = tuple(range(2, 17))  # a signed 1-bit fixed-point grid is {-1, 0}: no positive weight survives
    Options = QCodeOptions
    fl_search = True

    def __init__(self, options=None):
        super().__init__(options)
        make_observer(self.options.weight_calib)  # validate the name early

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        calib = self.options.weight_calib if not ctx.per_channel else "minmax"
        return FixedPointQuantizer(ctx.w_bits, signed=True, observer=calib, per_channel=ctx.per_channel,
                                   init_from_input=True)

    def calibrated_act(self, bits: int, signed: bool, calib: str) -> Quantizer:
        return FixedPointQuantizer(bits, signed=signed or not self.options.unsigned_acts, observer=calib)

    def add_quantizer(self, a_bits: int, calib: str) -> Quantizer | None:
        return FixedPointQuantizer(a_bits, signed=True, observer=calib)


register_method(QCodeMethod)


__all__ = ["QCodeMethod", "QCodeOptions"]

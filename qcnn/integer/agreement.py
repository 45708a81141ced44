"""Agreement between the fake-quant simulation, the integer engine and ONNX Runtime, in integer codes.

The simulation (the quantized model in eval mode) defines the expected codes of every quantizer:
:func:`simulation_codes` records them with forward hooks (``grid().to_codes(output)``). It runs in float32
as in training, or with ``dtype=torch.float64`` on a float64 copy of the model: the same grids and rules
(codes ``round(x * fl32(1/s))``, ties to even) evaluated without float32 rounding of the convolutions and
dequantized values. The float32 simulation differs from its own float64 evaluation wherever a value lies
within float32 rounding error of a tie, and such one-LSB flips spread with depth (ResNet-20 W8A8: 99.6 %
of the codes equal end to end); the integer engine (``requant="int64"``) reproduces the float64 evaluation.
Two measures:

* **per layer** (teacher forcing): each layer of the engine gets exactly the simulation's input codes, so
  its output codes differ only where the float simulation sits next to a rounding tie (<= 1 LSB);
* **end to end**: the engine runs on its own codes. A one-LSB difference in a layer's input moves many
  outputs of the next layer by a fraction of an LSB, so differences spread with depth; top-1 agreement
  is the end-to-end measure that matters.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Quantizer
from qcnn.transform import fold_conv_bn


@torch.no_grad()
def float64_simulation(model: nn.Module) -> nn.Module:
    """A float64 copy of a quantized model with exactly the float32 model's grids: weights and biases frozen
    to their exact grid values ``(q_w - z_w) s_w`` and ``round(b / (s_x s_w)) s_x s_w`` (codes and scales as the
    float32 model computes them; its FQN conv+BN pairs folded first, as the engine compiles them), activation
    quantizers with the float32 scales (:func:`qcnn.quant.uniform.fake_quant_float64`)."""
    m = fold_conv_bn(copy.deepcopy(model))
    frozen = {}
    for name, mod in m.named_modules():
        if isinstance(mod, (QConv2d, QLinear)) and isinstance(mod.weight_quant, Quantizer):
            g = mod.weight_quant.grid().integer_view()
            if g is None or g.scale is None:
                continue
            w = mod.quantized_weight().detach()
            shape = [-1] + [1] * (w.dim() - 1) if g.scale.numel() > 1 else [1] * w.dim()
            z = g.zero_point.to(torch.float64).reshape(shape) if g.zero_point is not None else 0.0
            w64 = (g.to_codes(w).to(torch.float64) - z) * g.scale.to(torch.float32).to(torch.float64).reshape(shape)
            b = mod.bias
            bq = getattr(mod, "bias_quant", None)
            b64 = None if b is None else (bq(b.detach().to(torch.float64), mod) if bq is not None else
                                          b.detach().to(torch.float64))
            frozen[name] = (w64, b64)
    m = m.double()
    for name, mod in m.named_modules():
        if name in frozen:
            w64, b64 = frozen[name]
            mod.weight.data = w64
            mod.weight_quant = None
            if b64 is not None:
                mod.bias.data = b64
                mod.bias_quant = None
    return m


@torch.no_grad()
def simulation_codes(model: nn.Module, x: Tensor, dtype: torch.dtype = torch.float32
                     ) -> tuple[Tensor, dict[str, Tensor]]:
    """(float output, codes of every ``<module>.input_quant`` / ``<module>.out_quant``) of ``model`` on ``x``;
    ``dtype=torch.float64`` evaluates a float64 copy of ``model`` (``model`` itself is left unchanged)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype} must be torch.float32 or torch.float64")
    if dtype == torch.float64:
        model = float64_simulation(model)
        x = x.double()
    codes: dict[str, Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        for slot in ("input_quant", "out_quant"):
            q = getattr(mod, slot, None)
            if isinstance(q, Quantizer):
                p = f"{name}.{slot}"
                hooks.append(q.register_forward_hook(
                    lambda m, i, o, p=p: codes.__setitem__(p, m.grid().to_codes(o).to(torch.int64))))
    was = model.training
    model.eval()
    try:
        out = model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return out, codes


def compare_codes(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict:
    """Fraction of equal codes, max |difference| (LSB) over all points, and the worst point."""
    total = equal = 0
    worst, worst_p, max_diff = 1.0, None, 0
    for p, w in want.items():
        if p not in got:
            continue
        g = torch.as_tensor(np.asarray(got[p])) if not isinstance(got[p], Tensor) else got[p]
        d = (g.to(torch.int64).cpu() - w.cpu()).abs()
        n, e = d.numel(), int((d == 0).sum())
        total += n
        equal += e
        max_diff = max(max_diff, int(d.max()) if n else 0)
        if n and e / n < worst:
            worst, worst_p = e / n, p
    return {"equal": equal / max(total, 1), "max_diff": max_diff, "elements": total, "points": len(want),
            "worst_point": worst_p, "worst_equal": worst}


__all__ = ["compare_codes", "float64_simulation", "simulation_codes"]

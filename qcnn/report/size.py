"""Model size and bit operations (BOPs) of a quantized model.

* Weight storage of a quantized layer: ``numel(W) * b_w`` bits (``b_w`` from the weight quantizer's grid;
  a codebook of ``L`` levels needs ``ceil(log2 L)`` bits per weight) plus its 32-bit bias; every other
  parameter and every float layer counts 32 bits.
* BOPs of a conv/linear layer: ``MACs * b_w * b_a`` (Baskin et al.'s bit-operation count; a float
  operand counts 32 bits). MACs are counted per image with forward hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from qcnn.nn.layers import QConv2d, QLinear

FLOAT_BITS = 32


def quantizer_bits(q: nn.Module | None) -> int:
    """Bits per value of a quantizer's output (32 for None / float)."""
    if q is None or not hasattr(q, "bits"):
        return FLOAT_BITS
    try:
        g = q.grid()
    except (NotImplementedError, RuntimeError):
        return int(q.bits)
    if g.levels is not None:
        return max(1, math.ceil(math.log2(max(2, g.levels.numel()))))
    return int(g.bits)


@dataclass
class LayerCost:
    name: str
    kind: str
    params: int
    w_bits: int
    a_bits: int
    macs: int
    weight_bytes: float

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


def _weight_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            yield name, m


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs per image of every Conv2d/Linear, measured with forward hooks on ``example``."""
    macs: dict[str, int] = {}
    hooks = []
    for name, m in _weight_layers(model):
        def hook(mod, inp, out, name=name):
            per_out = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features
            macs[name] = int(out[0].numel() * per_out)
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def layer_costs(model: nn.Module, example: torch.Tensor) -> list[LayerCost]:
    macs = count_macs(model, example)
    out = []
    for name, m in _weight_layers(model):
        quantized = isinstance(m, (QConv2d, QLinear))
        wb = quantizer_bits(m.weight_quant) if quantized else FLOAT_BITS
        ab = quantizer_bits(m.input_quant) if quantized else FLOAT_BITS
        n = m.weight.numel()
        bias_bits = FLOAT_BITS * (m.bias.numel() if m.bias is not None else 0)
        out.append(LayerCost(name, type(m).__name__, n, wb, ab, macs.get(name, 0), (n * wb + bias_bits) / 8))
    return out


def model_size_bytes(model: nn.Module) -> float:
    """Storage of all parameters at their quantized bit widths (see module docstring)."""
    seen: set[int] = set()
    total_bits = 0
    for _, m in _weight_layers(model):
        quantized = isinstance(m, (QConv2d, QLinear))
        wb = quantizer_bits(m.weight_quant) if quantized else FLOAT_BITS
        total_bits += m.weight.numel() * wb
        seen.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in seen:
            total_bits += p.numel() * FLOAT_BITS
            seen.add(id(p))
    return total_bits / 8


def summarize(model: nn.Module, example: torch.Tensor) -> dict:
    costs = layer_costs(model, example)
    size = model_size_bytes(model)
    float_size = sum(p.numel() for p in model.parameters()) * 4
    return {
        "size_bytes": size,
        "float_size_bytes": float_size,
        "compression": float_size / size if size else float("nan"),
        "macs": sum(c.macs for c in costs),
        "bops": sum(c.bops for c in costs),
        "float_bops": sum(c.macs for c in costs) * FLOAT_BITS * FLOAT_BITS,
        "layers": [c.__dict__ | {"bops": c.bops} for c in costs],
    }

"""quantize() enforces what a method defines, and keeps the model's architecture record."""

import copy

import pytest
import torch

from qcnn.methods import quantize
from qcnn.models import arch_record, build_model
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe


def _layers(q):
    return [m for m in q.modules() if isinstance(m, (QConv2d, QLinear))]


@pytest.mark.parametrize("method", ["elq", "vnq"])
def test_weight_only_method_refuses_activation_bits(method):
    """Was: Recipe(method='elq', a_bits=8) silently left activations float."""
    model = build_model("lenet5", in_channels=1, image_size=28)
    with pytest.raises(ValueError, match=rf"{method} quantizes weights only.*a_bits: null"):
        quantize(model, Recipe(method=method, w_bits=2, a_bits=8))
    q = quantize(model, Recipe(method=method, w_bits=2, a_bits=None))
    assert all(m.input_quant is None for m in _layers(q))


@pytest.mark.parametrize("method,w,a,match", [("lsq", 1, 4, "weights of 2-16 bits"),
                                              ("bireal", 2, 1, "weights of 1 bits"),
                                              ("bireal", 1, None, "quantizes activations by design"),
                                              ("hwgq", 2, 9, "activations of 1-8 bits")])
def test_undefined_bit_widths_are_refused_by_name(method, w, a, match):
    with pytest.raises(ValueError, match=match):
        quantize(build_model("lenet5"), Recipe(method=method, w_bits=w, a_bits=a))


def test_clipq_activation_bits_come_from_the_recipe():
    model = build_model("lenet5")
    floats = quantize(model, Recipe(method="clipq", w_bits=3, a_bits=None))
    assert all(m.input_quant is None for m in _layers(floats))
    q8 = quantize(model, Recipe(method="clipq", w_bits=3, a_bits=8, first_last="same"))
    assert all(isinstance(m.input_quant, UniformQuantizer) and m.input_quant.bits == 8 for m in _layers(q8))
    with pytest.raises(ValueError, match="unknown option.*act_bits"):
        quantize(model, Recipe(method="clipq", w_bits=3, a_bits=None, params={"act_bits": 8}))


def test_quantized_model_keeps_the_architecture_record_through_deepcopy():
    model = build_model("resnet20", width=0.25)
    q = quantize(model, Recipe(w_bits=4, a_bits=4))
    expect = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "width": 0.25, "kwargs": {}}
    assert arch_record(model) == expect
    assert arch_record(q) == expect
    assert arch_record(copy.deepcopy(q)) == expect  # fx GraphModule deepcopy drops plain attributes
    assert arch_record(torch.nn.Linear(2, 2)) is None

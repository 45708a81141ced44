"""WAGE procedure: the BN-free network it builds and a short from-scratch run on real Fashion-MNIST."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcnn.methods import run_recipe
from qcnn.methods.wage import wage_network
from qcnn.models import build_model
from qcnn.models.wage_nets import LeNet5Wage, VGG7Wage
from qcnn.quant.wage import WageWeightQuantizer, wage_c, wage_q
from qcnn.recipes import Recipe


def test_wage_network_maps_zoo_models():
    net = wage_network(build_model("lenet5", in_channels=1, width=2.0))
    assert isinstance(net, LeNet5Wage) and net.conv1.out_channels == 12 and net.conv1.in_channels == 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    vgg = wage_network(build_model("vgg7", width=0.25))
    assert isinstance(vgg, VGG7Wage) and vgg.features[0].out_channels == 32
    assert all(m.bias is None for m in vgg.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    same = build_model("lenet5_wage")
    assert wage_network(same) is same
    with pytest.raises(ValueError, match="WAGE"):
        wage_network(build_model("resnet20"))


def test_wage_trains_on_fashion_mnist_and_stays_on_grid(fashion_dir):
    from qcnn.data import get_data

    b = get_data("fashion-mnist", fashion_dir, batch_size=64)
    b = dataclasses.replace(b, train=b.train.take(4000), test=b.test.take(1000), calib=b.calib.take(256))
    recipe = Recipe.from_dict(dict(method="wage", w_bits=2, a_bits=8, g_bits=8, e_bits=8, first_last="same",
                                   per_channel=False, procedure="wage",
                                   train=dict(epochs=1, batch_size=64, lr=8.0, momentum=0.0, weight_decay=0.0,
                                              schedule="constant")))
    torch.manual_seed(0)
    q, metrics = run_recipe(build_model("lenet5", in_channels=1), b, recipe)
    assert metrics["top1"] > 30.0  # chance is 10%; 35-60% after 4000 images at 2-8-8-8
    for m in q.modules():
        if isinstance(getattr(m, "weight_quant", None), WageWeightQuantizer):
            w = m.weight.detach()
            assert torch.equal(w * 128, torch.round(w * 128)) and float(w.abs().max()) <= 0.5
            assert set(wage_q(wage_c(w, 2), 2).unique().tolist()) <= {-0.5, 0.0, 0.5}

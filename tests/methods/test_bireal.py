"""Bi-Real procedure: weight transfer, epoch split, BN-only retraining and a run on real Fashion-MNIST."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qcnn.methods import run_recipe
from qcnn.methods.bireal import bireal_network, split_epochs
from qcnn.models import build_model
from qcnn.models.bireal import BiRealCifarResNet, LeNet5BiReal
from qcnn.quant.binary import MagnitudeAwareBinaryWeight
from qcnn.recipes import Recipe


def test_network_mapping_transfers_weights_by_name():
    torch.manual_seed(0)
    lenet = build_model("lenet5", in_channels=1)
    net, copied, kept = bireal_network(lenet)
    assert isinstance(net, LeNet5BiReal)
    assert torch.equal(net.conv2.weight, lenet.conv2.weight) and torch.equal(net.fc1.weight, lenet.fc1.weight)
    assert torch.equal(net.bn1.running_var, lenet.bn1.running_var)
    assert sorted({k.split(".")[0] for k in kept}) == ["bn3", "bn4"]
    r20 = build_model("resnet20")
    net, copied, kept = bireal_network(r20)
    assert isinstance(net, BiRealCifarResNet)
    assert torch.equal(net.layer2[1].conv2.weight, r20.layer2[1].conv2.weight)
    assert {k.split(".")[2] for k in kept} == {"downsample"}  # only the new 1x1 shortcuts
    assert len(copied) == len(r20.state_dict())
    with pytest.raises(ValueError, match="Bi-Real"):
        bireal_network(build_model("vgg7"))


def test_split_epochs():
    assert split_epochs(3, {}) == (1, 1, 1)
    assert split_epochs(5, {}) == (1, 3, 1)
    assert split_epochs(3, {"pretrain_epochs": 0, "binary_epochs": 2, "bn_epochs": 1}) == (0, 2, 1)
    with pytest.raises(ValueError, match="bn_epochs"):
        split_epochs(3, {"pretrain_epochs": 0, "binary_epochs": 2, "bn_epochs": -1})


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    from qcnn.data import get_data

    b = get_data("fashion-mnist", fashion_dir, batch_size=64)
    return dataclasses.replace(b, train=b.train.take(3000), test=b.test.take(1000), calib=b.calib.take(256))


def _recipe(pre, binary, bn):
    return Recipe.from_dict(dict(method="bireal", w_bits=1, a_bits=1, first_last="fp32", procedure="bireal",
                                 procedure_params=dict(pretrain_epochs=pre, binary_epochs=binary, bn_epochs=bn),
                                 train=dict(epochs=pre + binary + bn, batch_size=64, optimizer="adam", lr=0.002,
                                            weight_decay=0.0, schedule="constant")))


def test_bn_only_step_moves_only_batchnorm(fashion):
    torch.manual_seed(0)
    model = build_model("lenet5_bireal", in_channels=1)
    q, metrics = run_recipe(model, fashion, _recipe(0, 0, 1))
    src = dict(model.named_parameters())
    for n, p in q.named_parameters():
        if ".bn" in f".{n}" or n.startswith("bn"):
            continue
        assert torch.equal(p, src[n]), n
    assert not torch.equal(q.bn3.weight, model.bn3.weight)
    assert "bn_top1" in metrics


def test_two_step_on_fashion_mnist(fashion):
    torch.manual_seed(0)
    q, metrics = run_recipe(build_model("lenet5", in_channels=1), fashion, _recipe(1, 1, 0))
    assert isinstance(q.fc1.weight_quant, MagnitudeAwareBinaryWeight)
    assert metrics["pretrain_top1"] > 55.0
    assert metrics["top1"] > 50.0  # binary LeNet after 3000 images of each step (chance 10%)

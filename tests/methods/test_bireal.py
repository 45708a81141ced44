"""Bi-Real procedure: weight transfer, epoch split, BN-only retraining and a run on real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from qcnn.methods import run_recipe
from qcnn.methods.bireal import bireal_network, split_epochs
from qcnn.models import arch_record, build_model
from qcnn.models.bireal import BiRealCifarResNet, LeNet5BiReal
from qcnn.quant.binary import MagnitudeAwareBinaryWeight
from qcnn.recipes import Recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


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
    assert split_epochs(3, {"pretrain_epochs": 0, "binary_epochs": 2, "bn_epochs": 1}) == (0, 2, 1)
    with pytest.raises(ValueError, match="bn_epochs"):
        split_epochs(3, {"pretrain_epochs": 0, "binary_epochs": 2, "bn_epochs": -1})


def test_pretraining_gets_as_long_as_the_binary_stage():
    # default: bn = 1 (the official single BN epoch), pretrain = (T - bn) // 2, binary the rest; the even
    # three-way split used to give 1 of 5 epochs (0 of 2) to the real-valued clip(-1, x, 1) pretraining
    assert split_epochs(5, {}) == (2, 2, 1)
    assert split_epochs(9, {}) == (4, 4, 1)
    assert split_epochs(2, {}) == (1, 1, 0)
    assert split_epochs(1, {}) == (0, 1, 0)
    # a stage given is kept, the others share what is left of train.epochs
    assert split_epochs(9, {"pretrain_epochs": 6}) == (6, 2, 1)
    assert split_epochs(9, {"bn_epochs": 0}) == (4, 5, 0)
    recipe = Recipe.from_yaml(RECIPES / "bireal.yaml")
    pre, binary, bn = split_epochs(recipe.train.epochs, recipe.procedure_params)
    assert pre >= 2 and pre >= binary and bn == 1


def test_recipe_optimiser_keeps_the_magnitude_aware_factor():
    """dL/dW_r[o] = dL/dW_b[o] * s_o with s_o = mean|W_r[o]|: under the recipe's optimiser (SGD, momentum 0.9,
    no weight decay) a channel's step is proportional to s_o; Adam's m / sqrt(v) divides s_o out again."""
    from qcnn.train import make_default_optimizer

    recipe = Recipe.from_yaml(RECIPES / "bireal.yaml")
    assert recipe.train.optimizer == "sgd" and recipe.train.momentum == 0.9 and recipe.train.weight_decay == 0.0
    pattern = torch.tensor([0.5, -1.0, 1.5, -2.0], dtype=torch.float64)  # float64: steps read off exactly
    s = torch.tensor([0.1, 0.4], dtype=torch.float64)  # mean|W| of the two output channels (|W| < 1 everywhere)
    g_b = torch.tensor([[0.3, -0.2, 0.1, 0.4]], dtype=torch.float64).expand(2, 4)  # same dL/dW_b for both

    def steps(spec, n=3):
        w = torch.nn.Parameter(s[:, None] * pattern / pattern.abs().mean())
        opt = make_default_optimizer([{"params": [w]}], spec)
        w0 = w.detach().clone()
        for _ in range(n):
            opt.zero_grad()
            (MagnitudeAwareBinaryWeight()(w) * g_b).sum().backward()
            opt.step()
        return (w.detach() - w0).abs()

    step = steps(recipe.train, n=1)
    assert torch.allclose(step, recipe.train.lr * s[:, None] * g_b.abs(), rtol=1e-9)  # -lr * dL/dW_r
    assert torch.allclose(step[1] / step[0], torch.full((4,), 4.0, dtype=torch.float64), rtol=1e-9)
    several = steps(recipe.train)  # momentum accumulates the same per-channel ratio (s_o moves a little)
    assert (several[1] / several[0]).min() > 3.5
    adam = steps(dataclasses.replace(recipe.train, optimizer="adam"))
    assert torch.allclose(adam[1] / adam[0], torch.ones(4, dtype=torch.float64), rtol=1e-2)  # Adam: equal steps


def _synthetic_bundle(n=16, channels=3, side=32):
    from qcnn.data import Normalize, TensorLoader
    from qcnn.data.loaders import DataBundle

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    mean, std = (0.5,) * channels, (0.25,) * channels
    loader = lambda: TensorLoader(images, labels, batch_size=8, normalize=Normalize(mean, std))  # noqa: E731
    return DataBundle("synthetic", loader(), loader(), loader(), 10, channels, side, mean, std)


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56", "lenet5"])
def test_model_pt_records_the_bireal_architecture_of_every_depth(name, tmp_path):
    """The qat command's path: run_recipe -> the model's arch record -> save_model; load_model rebuilds
    the Bi-Real network of the right depth and computes exactly the same outputs."""
    from qcnn.checkpoint import load_model, save_model

    torch.manual_seed(0)
    channels, side = (1, 28) if name == "lenet5" else (3, 32)
    bundle = _synthetic_bundle(channels=channels, side=side)
    model = build_model(name, in_channels=channels, width=0.25 if name != "lenet5" else 1.0)
    arch = {"name": name, "num_classes": 10, "in_channels": channels, "width": 0.25, "kwargs": {}}
    recipe = Recipe.from_yaml(RECIPES / "bireal.yaml").replace(
        procedure_params={"pretrain_epochs": 0, "binary_epochs": 0, "bn_epochs": 0})
    q, metrics = run_recipe(model, bundle, recipe)
    arch = arch_record(q) or arch  # as qcnn/commands/qat.py does
    expect = f"bireal_{name}" if name != "lenet5" else "lenet5_bireal"
    assert arch["name"] == expect
    with torch.no_grad():  # non-trivial BN statistics, so that a state not reloaded would show
        for m in q.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    save_model(tmp_path / "model.pt", q, arch, recipe=recipe, metrics=metrics)
    back, info = load_model(tmp_path / "model.pt")
    assert info["arch"]["name"] == expect
    assert sum(isinstance(m, MagnitudeAwareBinaryWeight) for m in back.modules()) == \
        sum(isinstance(m, MagnitudeAwareBinaryWeight) for m in q.modules())
    x = torch.randn(4, channels, side, side)
    with torch.no_grad():
        assert torch.equal(back(x), q.eval()(x))


def test_every_cifar_depth_maps_to_its_zoo_record():
    from qcnn.models import build_model as build
    from qcnn.models.bireal import CIFAR_DEPTHS

    for depth in CIFAR_DEPTHS:
        net, _, _ = bireal_network(build(f"resnet{depth}", width=0.25))
        rec = arch_record(net)
        assert rec == {"name": f"bireal_resnet{depth}", "num_classes": 10, "in_channels": 3, "width": 0.25,
                       "kwargs": {}}
        assert sum(1 for _ in net.layer1) == (depth - 2) // 6
        rebuilt = build(rec["name"], num_classes=rec["num_classes"], in_channels=rec["in_channels"],
                        width=rec["width"], **rec["kwargs"])
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
            {k: v.shape for k, v in net.state_dict().items()}


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

"""VNQ procedure: KL warm-up, ELBO training on real Fashion-MNIST lowers the loss, the result is ternary."""

from __future__ import annotations

import pytest
import torch

from qcnn.methods import quantize, run_recipe
from qcnn.methods.vnq import ELBOLoss, VNQProcedureOptions, kl_total
from qcnn.models import build_model
from qcnn.recipes import Recipe
from qcnn.transform import to_variational, variational_layers


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    from qcnn.data import get_data

    return get_data("fashion-mnist", data_dir=fashion_dir, batch_size=64, augment=False, calib_size=500).take(1024)


def _recipe(**pp):
    return Recipe.from_dict({"method": "vnq", "w_bits": 2, "a_bits": None, "first_last": "same", "procedure": "vnq",
                             "params": {"sigma_lr": 0.01}, "procedure_params": pp,
                             "train": {"epochs": 2, "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0}})


def test_kl_warmup():
    loss = ELBOLoss(n_train=100, warmup_steps=4, kl_weight=2.0)
    betas = []
    for _ in range(6):
        betas.append(loss.beta())
        loss.calls += 1
    assert betas == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


def test_elbo_training_on_fashion_mnist_improves_loss(fashion):
    torch.manual_seed(0)
    q = to_variational(quantize(build_model("lenet5", in_channels=1), _recipe()))
    x_eval, y_eval = next(iter(fashion.test))
    n = 1024
    elbo = ELBOLoss(n, warmup_steps=0)
    opt = torch.optim.Adam(q.parameters(), lr=3e-3)

    def full_loss():
        torch.manual_seed(1)
        with torch.no_grad():
            q.train()
            return (torch.nn.functional.cross_entropy(q(x_eval), y_eval) + kl_total(q) / n).item()

    before = full_loss()
    for _ in range(2):
        for x, y in fashion.train:
            opt.zero_grad()
            elbo(q.train(), x, y)[0].backward()
            opt.step()
    assert full_loss() < 0.7 * before


def test_procedure_gives_ternary_layers(fashion):
    torch.manual_seed(0)
    qmodel, metrics = run_recipe(build_model("lenet5", in_channels=1), fashion, _recipe(warmup=0.5))
    assert 0.0 < metrics["pruned_fraction"] < 1.0
    assert metrics["top1"] > 20.0
    for name, m in variational_layers(qmodel):
        r = m.weight_quant.r.abs().detach()
        assert torch.isin(m.weight.detach(), torch.stack([-r, torch.zeros_like(r), r])).all(), name
        assert metrics["vnq_layers"][name]["zero_fraction"] == pytest.approx(float((m.weight == 0).float().mean()))


def test_bad_procedure_params():
    with pytest.raises(ValueError, match="unknown procedure_params"):
        VNQProcedureOptions.from_dict({"warm_up": 0.1})
    with pytest.raises(ValueError, match="warmup"):
        VNQProcedureOptions(warmup=2.0)


def test_reestimate_bn_uses_snapped_mean_weights_and_trains_nothing():
    import math

    from torch import nn

    from qcnn.methods.vnq import reestimate_bn
    from qcnn.nn.layers import QLinear
    from qcnn.nn.vnq import VNQLinear
    from qcnn.quant.vnq import VNQQuantizer

    torch.manual_seed(0)
    lin = QLinear.from_float(nn.Linear(3, 2), weight_quant=None)
    lin.weight_quant = VNQQuantizer(lin.weight, log_sigma2_init=math.log(4.0))  # large noise if it were on
    model = nn.Sequential(VNQLinear.from_float(lin, None, lin.weight_quant, None), nn.BatchNorm1d(2))
    model[1].running_mean.fill_(5.0)
    xs = torch.randn(70, 3)
    loader = [(xs[i:i + 32], torch.zeros(len(xs[i:i + 32]), dtype=torch.long)) for i in range(0, 70, 32)]
    params = {k: v.clone() for k, v in model.named_parameters()}
    assert reestimate_bn(model.train(), loader, images=50) == 50
    assert model.training  # mode restored
    with torch.no_grad():
        h = model[0].eval()(xs[:50])  # mean weights, first 50 images only
    # cumulative average over batches of 32 and 18 images: batch-size weighted only through the batch means
    m1, m2 = h[:32].mean(0), h[32:].mean(0)
    v1, v2 = h[:32].var(0), h[32:].var(0)
    assert torch.allclose(model[1].running_mean, (m1 + m2) / 2, atol=1e-5)
    assert torch.allclose(model[1].running_var, (v1 + v2) / 2, atol=1e-4)
    assert model[1].momentum == 0.1
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k


def test_procedure_bn_images_option(fashion):
    torch.manual_seed(0)
    recipe = _recipe(warmup=0.5, bn_images=256)
    recipe = recipe.replace(train={"epochs": 1})
    qmodel, metrics = run_recipe(build_model("lenet5", in_channels=1), fashion, recipe)
    assert metrics["bn_images"] == 256
    assert "top1_snap_no_bn" in metrics and metrics["top1"] != metrics["top1_snap_no_bn"]
    with pytest.raises(ValueError, match="bn_images"):
        VNQProcedureOptions(bn_images=-1)

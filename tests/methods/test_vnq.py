"""VNQ procedure: KL warm-up, ELBO training on real Fashion-MNIST lowers the loss, the result is ternary."""

from __future__ import annotations

import pytest
import torch

from qcnn.methods import run_recipe
from qcnn.methods.vnq import ELBOLoss, VNQProcedureOptions
from qcnn.models import build_model
from qcnn.quant.vnq import kl_total, to_variational, variational_layers
from qcnn.recipes import Recipe
from qcnn.transform import quantize


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    from qcnn.data import get_data

    return get_data("fashion-mnist", data_dir=fashion_dir, batch_size=64, augment=False, calib_size=500).take(1024)


def _recipe(**pp):
    return Recipe.from_dict({"method": "vnq", "w_bits": 2, "first_last": "same", "procedure": "vnq",
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

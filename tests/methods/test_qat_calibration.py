"""QAT calibration sees the quantized network's own statistics (train-mode BN, BN re-estimation)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcnn.calib import batchnorm_in_train_mode, reestimate_bn
from qcnn.methods import calibrate, quantize, quantize_and_calibrate
from qcnn.nn.layers import QAdd
from qcnn.quant.pact import PACTQuantizer
from qcnn.recipes import Recipe, load_recipe


@pytest.fixture(scope="module")
def resnet_and_data(cifar_zip, weights_dir):
    from qcnn.data import get_data
    from qcnn.models import build_model, load_weights

    torch.manual_seed(0)
    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=128, augment=False, calib_size=512)
    model = load_weights(build_model("resnet20"), weights_dir / "resnet20-12fca82f.th").eval()
    return model, bundle


def _add_tops(q: nn.Module) -> list[float]:
    return [float(m.out_quant._implied_range()[1]) for m in q.modules() if isinstance(m, QAdd)]


@pytest.fixture(scope="module")
def float_add_tops(resnet_and_data):
    model, bundle = resnet_and_data
    ref = quantize(model, Recipe(method="uniform", w_bits=16, a_bits=16, first_last="same"))
    return _add_tops(calibrate(ref, bundle.calib, 512))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pact", "dorefa"])
def test_resnet20_w2a2_calibrated_ranges_follow_the_float_network(resnet_and_data, float_add_tops, method):
    """At W2A2 with eval-mode BN the residual ranges blew up from ~10 to >1000 and the network sat at
    chance; with train-mode BN and re-estimated statistics they stay within 2x of the float ranges."""
    model, bundle = resnet_and_data
    recipe = load_recipe(method).replace(w_bits=2, a_bits=2, first_last="8bit", calib_images=512)
    q = quantize_and_calibrate(model, recipe, bundle)
    f_tops, q_tops = float_add_tops, _add_tops(q)
    assert len(f_tops) == len(q_tops) == 9
    for i, (f, a) in enumerate(zip(f_tops, q_tops)):
        assert 0.5 <= a / f <= 2.0, (i, f, a)
    if method == "pact":  # alphas no larger than twice the float activations' maximum (~3-11 here)
        alphas = [float(m.alpha.detach()) for m in q.modules() if isinstance(m, PACTQuantizer)]
        assert alphas and max(alphas) < 2 * max(f_tops)
    # right after calibration the quantized net, in train mode, is far above chance on training batches
    correct = seen = 0
    q.train()
    with torch.no_grad():
        for i, (x, y) in enumerate(bundle.train):
            if i == 3:
                break
            correct += int((q(x).argmax(1) == y).sum())
            seen += len(y)
    assert 100 * correct / seen > 20.0, 100 * correct / seen


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_batchnorm_in_train_mode_uses_batch_statistics_and_restores_state():
    torch.manual_seed(0)
    net = _Net().eval()
    net.bn.running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(8, 1, 5, 5) * 3 + 2
    with batchnorm_in_train_mode(net):
        assert net.bn.training and not net.drop.training and not net.training
        y = net(x)
    # batch statistics: every channel of the output has mean ~0 over the batch
    assert y.mean((0, 2, 3)).abs().max() < 1e-5
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not net.training and not net.bn.training


def test_reestimate_bn_is_the_exact_average_of_the_quantized_network_statistics():
    torch.manual_seed(0)
    net = _Net()
    q = quantize(net, Recipe(method="uniform", w_bits=2, a_bits=8, first_last="same", quantize_adds=False))
    xs = [torch.randn(10, 1, 5, 5) for _ in range(3)]
    with torch.no_grad():
        calibrate(q, [(x, None) for x in xs], bn_train=True)
        assert reestimate_bn(q, [(x, None) for x in xs], images=30) == 30
        outs = [q.eval().conv(x) for x in xs]
    # equal-weight average of the per-batch statistics (BatchNorm's momentum=None), quantized weights
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(q.bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(q.bn.running_var, var, rtol=1e-5)
    assert q.bn.momentum == 0.1  # restored


def test_qat_recipe_calibrates_with_train_bn_ptq_with_float_bn(monkeypatch):
    import qcnn.methods as methods

    seen = []
    real = methods.calibrate
    monkeypatch.setattr(methods, "calibrate", lambda q, loader, n=None, bn_train=False: seen.append(bn_train) or
                        real(q, loader, n, bn_train))
    torch.manual_seed(0)
    bundle = type("B", (), {"calib": [(torch.randn(8, 1, 5, 5), None)]})()
    methods.quantize_and_calibrate(_Net(), Recipe(w_bits=4, a_bits=4, train={"epochs": 1}), bundle)
    methods.quantize_and_calibrate(_Net(), Recipe(w_bits=8, a_bits=8, train={"epochs": 0}), bundle)
    assert seen == [True, False]

"""Model zoo: registry, shapes, width, option-A shortcut, fx tracing, shared checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from qcnn.models import build_model, list_models, load_weights, register_model
from qcnn.models.resnet_cifar import ShortcutA


def test_registry_lists_zoo_and_rejects_unknown_names():
    names = list_models()
    for n in ("lenet5", "resnet20", "resnet32", "resnet44", "resnet56", "vgg_small", "vgg7"):
        assert n in names
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="registered twice"):
        register_model("resnet20")(lambda **kw: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet5", num_classes=0)
    with pytest.raises(ValueError, match="width"):
        build_model("lenet5", width=0)


@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586),
                                         ("resnet56", 853_018)])
def test_cifar_resnet_parameter_counts(name, params):
    # He et al. report 0.27M / 0.46M / 0.66M / 0.85M parameters
    m = build_model(name)
    assert sum(p.numel() for p in m.parameters()) == params
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["lenet5", "vgg_small", "vgg7"])
@pytest.mark.parametrize("in_ch,side", [(1, 28), (3, 32)])
def test_small_models_take_mnist_and_cifar_inputs(name, in_ch, side):
    m = build_model(name, num_classes=7, in_channels=in_ch).eval()
    assert m(torch.randn(3, in_ch, side, side)).shape == (3, 7)


def test_lenet5_layout():
    m = build_model("lenet5", in_channels=1)
    assert [m.conv1.out_channels, m.conv2.out_channels, m.fc1.in_features, m.fc1.out_features,
            m.fc2.out_features] == [6, 16, 400, 120, 84]
    assert isinstance(m.bn1, nn.BatchNorm2d) and isinstance(m.bn2, nn.BatchNorm2d)
    assert build_model("lenet5", in_channels=3).fc1.in_features == 16 * 5 * 5


def test_vgg_layouts():
    vs = build_model("vgg_small")
    convs = [m.out_channels for m in vs.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [128, 128, 256, 256, 512, 512]
    assert [m.out_features for m in vs.modules() if isinstance(m, nn.Linear)] == [10]
    v7 = build_model("vgg7")
    assert [(m.in_features, m.out_features) for m in v7.modules() if isinstance(m, nn.Linear)] == [
        (512 * 16, 1024), (1024, 10)]
    assert sum(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in v7.modules()) == 7
    v7n = build_model("vgg7", bn=False)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) for m in v7n.modules())


@pytest.mark.parametrize("width", [2.0, 3.0])
def test_width_multiplier_scales_channels(width):
    r = build_model("resnet20", width=width)
    assert [r.conv1.out_channels, r.layer2[0].conv1.out_channels, r.layer3[2].conv2.out_channels] == [
        16 * width, 32 * width, 64 * width]
    assert r.linear.in_features == 64 * width
    assert r(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    v = build_model("vgg7", width=width)
    assert v.features[0].out_channels == 128 * width
    lenet = build_model("lenet5", in_channels=1, width=width)
    assert lenet.conv1.out_channels == 6 * width and lenet.conv2.out_channels == 16 * width


def test_option_a_shortcut_is_subsample_plus_zero_channels():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    y = ShortcutA(4, 8, 2)(x)
    assert y.shape == (2, 8, 2, 2)
    assert torch.equal(y[:, 2:6], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :2]) == 0 and torch.count_nonzero(y[:, 6:]) == 0


def test_resnet_is_fx_traceable_with_plain_adds():
    import operator

    m = build_model("resnet20").eval()
    gm = fx.symbolic_trace(m)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    assert len(adds) == 9  # one residual add per BasicBlock
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm(x), m(x))


def test_quantize_turns_residual_adds_into_qadds():
    import qcnn
    from qcnn.nn.layers import QAdd

    q = qcnn.quantize(build_model("resnet20"), qcnn.Recipe(method="uniform", w_bits=8, a_bits=8))
    assert sum(isinstance(m, QAdd) for m in q.modules()) == 9


def test_shared_resnet_checkpoints_load_strictly(weights_dir):
    from qcnn.checkpoint import load_checkpoint

    for name, file in (("resnet20", "resnet20-12fca82f.th"), ("resnet56", "resnet56-4bfd9763.th")):
        m = build_model(name, weights=weights_dir / file)
        raw = load_checkpoint(weights_dir / file)["state_dict"]
        sd = m.state_dict()
        # every tensor of the file went in, under the name without "module."
        assert {k.removeprefix("module.") for k in raw} == {k for k in sd if not k.endswith("num_batches_tracked")}
        assert torch.equal(sd["layer3.2.conv2.weight"], raw["module.layer3.2.conv2.weight"])


def test_resnet20_checkpoint_of_other_architecture_is_refused_naming_keys(weights_dir):
    with pytest.raises(ValueError, match=r"missing keys \[layer1\.3\.conv1\.weight"):
        build_model("resnet32", weights=weights_dir / "resnet20-12fca82f.th")
    with pytest.raises(ValueError, match=r"unexpected keys \[layer1\.3\.conv1\.weight"):
        load_weights(build_model("resnet20"), weights_dir / "resnet56-4bfd9763.th")
    with pytest.raises(ValueError, match=r"shape mismatches \[conv1\.weight \(checkpoint \(16, 3, 3, 3\), "
                                         r"model \(32, 3, 3, 3\)\)"):
        build_model("resnet20", width=2, weights=weights_dir / "resnet20-12fca82f.th")


@pytest.mark.slow
def test_resnet20_shared_weights_accuracy_on_jpeg_test_slice(cifar_zip, weights_dir):
    from qcnn.data import get_data
    from qcnn.train import evaluate

    data = get_data("cifar10", data_dir=cifar_zip, batch_size=250, augment=False, calib_size=0)
    m = build_model("resnet20", weights=weights_dir / "resnet20-12fca82f.th")
    res = evaluate(m, data.test.take(500))
    # 81.0% on the full JPEG test set; a 500-image slice has a standard error of ~1.8 points
    assert 74.0 <= res["top1"] <= 88.0
    assert 0.3 < res["loss"] < 1.2


def test_torchvision_mobilenet_v2_from_local_weights(weights_dir):
    path = weights_dir / "mobilenet_v2-b0353104.pth"
    m = build_model("tv:mobilenet_v2", num_classes=1000, weights=path).eval()
    from qcnn.checkpoint import load_checkpoint

    raw = load_checkpoint(path)
    assert torch.equal(m.classifier[1].weight, raw["classifier.1.weight"])
    m10 = build_model("tv:mobilenet_v2", num_classes=10, weights=path)
    assert m10.classifier[1].out_features == 10
    assert torch.equal(m10.features[0][0].weight, raw["features.0.0.weight"])
    assert build_model("tv:resnet18", num_classes=10)(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    gray = build_model("tv:resnet18", num_classes=10, in_channels=1)
    assert gray.conv1.in_channels == 1
    with pytest.raises(ValueError, match="unknown torchvision classifier 'resnet19'"):
        build_model("tv:resnet19")
    with pytest.raises(ValueError, match="no width multiplier"):
        build_model("tv:resnet18", width=2.0)
    assert build_model("tv:mobilenet_v2", width=0.5).features[0][0].out_channels == 16

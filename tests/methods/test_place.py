"""quantize() enforces what a method defines, keeps the model's architecture record, and handles the layers users
bring: subclasses, Conv1d, ConvTranspose2d, overrides that match nothing, models fx cannot trace."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcnn.calib import calibrating
from qcnn.integer import to_integer
from qcnn.methods import quantize
from qcnn.methods.base import METHODS, UniformMethod
from qcnn.models import arch_record, build_model
from qcnn.nn.layers import QConv1d, QConv2d, QConvTranspose2d, QLinear, transposed_to_conv_layout
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import Recipe
from qcnn.transform import fold_bn, quantized_layers


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
    # PTQ folds BatchNorm first (a traced copy): the record must survive that too (a detector's task is read off it)
    assert arch_record(quantize(model, Recipe(w_bits=8, a_bits=8, fold_bn=True))) == expect


# -- the layers users bring: subclasses, Conv1d, ConvTranspose2d, overrides, untraceable models ------------------
class TimmLinear(nn.Linear):
    """timm's ``Linear``: an nn.Linear subclass outside torch.nn (fx traces through those by default)."""

    def forward(self, x):
        if torch.jit.is_scripting():
            return F.linear(x, self.weight.to(dtype=x.dtype), self.bias)
        return F.linear(x, self.weight, self.bias)


class PlainConv(nn.Conv2d):
    """A subclass that does not override forward."""


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = PlainConv(3, 8, 3, padding=1)
        self.fc1 = TimmLinear(8, 16)
        self.fc2 = TimmLinear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).mean(dim=(2, 3)))))


def _fake_quant(x, grid):
    """``(clamp(round(x fl32(1/s)) + z) - z) s`` with the grid's per-channel scales along its axis."""
    shape = [1] * x.dim()
    if grid.axis is not None:
        shape[grid.axis] = -1
    s = grid.scale.float().reshape(shape if grid.scale.dim() else [])
    z = grid.zero_point.float().reshape(shape if grid.zero_point.dim() else [])
    return (torch.clamp(torch.round(x * (1.0 / s)) + z, grid.qmin, grid.qmax) - z) * s


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_linear_and_conv_subclasses_are_quantized_with_the_grid_math():
    """Was: fx traced through the subclasses, which stayed float without a word."""
    torch.manual_seed(0)
    model, x = Head().eval(), torch.randn(8, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"TimmLinear \(Linear\) override forward") as rec:
        q = quantize(model, Recipe(method="uniform", w_bits=8, a_bits=8, first_last="same"))
    assert not any("PlainConv" in str(w.message) for w in rec)  # no own forward: nothing to warn about
    assert [(n, type(m)) for n, m in quantized_layers(q)] == [("conv", QConv2d), ("fc1", QLinear), ("fc2", QLinear)]
    with torch.no_grad(), calibrating(q):
        q(x)
    q.eval()
    with torch.no_grad():
        out = q(x)
        # the last layer's output is F.linear of its input and weight on their grids
        feats = {}
        q.fc2.register_forward_hook(lambda m, i, o: feats.update(x=i[0]))
        q(x)
        fc2 = q.fc2
        wq = _fake_quant(fc2.weight, fc2.weight_quant.grid())
        xq = _fake_quant(feats["x"], fc2.input_quant.grid())
        torch.testing.assert_close(out, F.linear(xq, wq, fc2.bias), atol=1e-6, rtol=1e-5)
        codes = fc2.quantized_weight() / fc2.weight_quant.grid().scale.reshape(-1, 1)
        assert torch.equal(codes.round(), torch.round(codes * 1e4) / 1e4)
        assert _cos(out, model(x)) > 0.99


def test_subclasses_survive_fold_bn():
    """Was: fold_bn's fx.symbolic_trace inlined a Linear subclass, which then left quantize()'s reach."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), TimmLinear(4 * 4 * 4, 3))
    model[1].running_mean.uniform_(-1, 1)
    model.eval()
    with pytest.warns(UserWarning, match="TimmLinear"):
        q = quantize(model, Recipe(w_bits=8, a_bits=8, fold_bn=True, first_last="same"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert [type(m) for _, m in quantized_layers(q)] == [QConv2d, QLinear]


def _conv1d_net():
    return nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1, groups=4),
                         nn.ReLU(), nn.Conv1d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 32, 5)).eval()


def _deconv_net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def _check_weight_grid(name, m):
    """Every weight on its grid: per output channel (axis 1 of a transposed conv's stored weight)."""
    g = m.weight_quant.grid()
    w = m.quantized_weight().detach()
    if isinstance(m, QConvTranspose2d):
        w = transposed_to_conv_layout(w, m.groups)
    assert g.axis == 0 and g.scale.shape == (w.shape[0],), name
    torch.testing.assert_close(g.scale, w.abs().flatten(1).amax(dim=1) / 127, msg=name)
    codes = w / g.scale.reshape(-1, *[1] * (w.dim() - 1))
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 127 + 1e-3, name


@pytest.mark.parametrize("make,x,kinds", [
    (_conv1d_net, (4, 3, 32), [QConv1d, QConv1d, QConv1d, QLinear]),
    (_deconv_net, (4, 3, 16, 16), [QConv2d, QConvTranspose2d, QConvTranspose2d, QConv2d]),
])
def test_conv1d_and_transposed_conv_models_quantize_at_w8a8(make, x, kinds):
    """Was: refused ("cannot be quantized"). Now quantized, cosine >= 0.99 to the float model."""
    torch.manual_seed(0)
    model, x = make(), torch.randn(*x)
    q = quantize(model, Recipe(method="uniform", w_bits=8, a_bits=8, first_last="same", per_channel=True))
    assert [type(m) for _, m in quantized_layers(q)] == kinds
    with torch.no_grad(), calibrating(q):
        q(x)
    q.eval()
    with torch.no_grad():
        out, ref = q(x), model(x)
    assert out.shape == ref.shape and _cos(out, ref) >= 0.99
    for name, m in quantized_layers(q):
        _check_weight_grid(name, m)


@pytest.mark.parametrize("method", ["qcode", "lsq"])
def test_other_per_channel_methods_on_transposed_convs(method):
    torch.manual_seed(0)
    model, x = _deconv_net(), torch.randn(4, 3, 16, 16)
    q = quantize(model, Recipe(method=method, w_bits=8, a_bits=8, first_last="same", per_channel=True))
    with torch.no_grad(), calibrating(q):
        q(x)
    q.eval()
    with torch.no_grad():
        assert _cos(q(x), model(x)) >= 0.99
    ct = q.get_submodule("2")
    g = ct.weight_quant.grid()
    assert isinstance(ct, QConvTranspose2d) and g.axis == 0 and g.scale.shape == (8,)  # one per output channel
    codes = transposed_to_conv_layout(ct.quantized_weight().detach(), 1) / g.scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)


@pytest.mark.parametrize("make,name,float_type", [(_conv1d_net, "2", nn.Conv1d),
                                                  (_deconv_net, "2", nn.ConvTranspose2d)])
def test_skip_override_leaves_conv1d_and_transposed_convs_float(make, name, float_type):
    model = make()
    q = quantize(model, Recipe(w_bits=8, a_bits=8, first_last="same", overrides=[{"pattern": name, "skip": True}]))
    assert type(q.get_submodule(name)) is float_type
    assert name not in dict(quantized_layers(q)) and len(quantized_layers(q)) == 3


class _Conv2dOnly(UniformMethod):
    name = "conv2d_only_for_test"
    supported = (nn.Conv2d, nn.Linear)


def test_method_without_transposed_convs_refuses_them_and_the_advised_skip_works(monkeypatch):
    """Was: the advised skip override gave the same error (skips were looked up among Conv2d/Linear only)."""
    monkeypatch.setitem(METHODS, _Conv2dOnly.name, _Conv2dOnly)
    model = _deconv_net()
    with pytest.raises(ValueError, match=r"layer '2' \(ConvTranspose2d\) cannot be quantized by method "
                                         r"'conv2d_only_for_test'.*override \{pattern: '2', skip: true\}"):
        quantize(model, Recipe(method=_Conv2dOnly.name))
    with pytest.raises(ValueError, match=r"layer '4' \(ConvTranspose2d\)"):
        quantize(model, Recipe(method=_Conv2dOnly.name, overrides=[{"pattern": "2", "skip": True}]))
    q = quantize(model, Recipe(method=_Conv2dOnly.name, overrides=[{"pattern": "[24]", "skip": True}]))
    assert [n for n, _ in quantized_layers(q)] == ["0", "6"]


def test_layer_with_no_quantized_version_is_refused_and_can_be_skipped():
    model = nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 2 * 2 * 2, 3))
    with pytest.raises(ValueError, match=r"layer '0' \(Conv3d\) cannot be quantized.*pattern: '0', skip: true"):
        quantize(model, Recipe())
    q = quantize(model, Recipe(first_last="same", overrides=[{"pattern": "0", "skip": True}]))
    assert type(q.get_submodule("0")) is nn.Conv3d and type(q.get_submodule("2")) is QLinear


def test_override_matching_no_layer_names_the_closest():
    """Was: ignored silently (a typo left the layer at the recipe's bits)."""
    model = build_model("resnet20", width=0.25)
    with pytest.raises(ValueError, match=r"override pattern 'layer1\.0\.conv3' matches no weight layer of "
                                         r"CifarResNet; closest layer names: \['layer1\.0\.conv2', "
                                         r"'layer1\.0\.conv1', .*\]; 20 layer names are valid"):
        quantize(model, Recipe(w_bits=4, a_bits=4, overrides=[{"pattern": "layer1.0.conv3", "w_bits": 8}]))
    with pytest.raises(ValueError, match=r"'nothing\*' matches no weight layer.*the first: \['conv1', "):
        quantize(model, Recipe(overrides=[{"pattern": "layer1.*", "w_bits": 8}, {"pattern": "nothing*", "skip": True}]))
    q = quantize(model, Recipe(w_bits=4, a_bits=4, overrides=[{"pattern": "layer1.*", "w_bits": 8}]))
    assert q.get_submodule("layer1.0.conv1").weight_quant.bits == 8


class _DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if y.mean() > 100:  # never true here; fx cannot know
            y = y * 0
        return self.fc(y.mean(dim=(2, 3)))


def test_fold_bn_on_an_untraceable_model_warns_and_keeps_bn():
    """Was: a raw torch.fx TraceError from fold_bn instead of the module-swap fallback."""
    torch.manual_seed(0)
    model, x = _DataDependent(), torch.randn(8, 3, 8, 8)
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    with pytest.warns(UserWarning) as rec:
        q = quantize(model, Recipe(method="uniform", w_bits=8, a_bits=8, first_last="same", fold_bn=True))
    messages = [str(w.message) for w in rec]
    assert any("could not trace _DataDependent" in m and "BatchNorm stays unfolded" in m for m in messages)
    assert any("falling back to module swap" in m for m in messages)
    assert type(q) is _DataDependent and isinstance(q.bn, nn.BatchNorm2d)
    assert isinstance(q.conv, QConv2d) and isinstance(q.fc, QLinear)
    with torch.no_grad(), calibrating(q):
        q(x)
    q.eval()
    with torch.no_grad():
        assert _cos(q(x), model(x)) >= 0.99
    with pytest.warns(UserWarning, match="BatchNorm stays unfolded"):
        assert fold_bn(model) is model  # unchanged, not a traceback


def test_layer_whose_weight_is_read_directly_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(F.linear(x, self.fc.weight))  # fc is never called as a module

    with pytest.raises(ValueError, match=r"layer 'fc' \(Linear\) is not called as a module.*'weight' directly"):
        quantize(Tied(), Recipe())
    q = quantize(Tied(), Recipe(first_last="same", overrides=[{"pattern": "fc", "skip": True}]))
    assert [n for n, _ in quantized_layers(q)] == ["out"]


def test_layer_called_twice_is_swapped_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(x))))

    q = quantize(Twice(), Recipe(w_bits=4, a_bits=4, first_last="8bit"))
    assert [n for n, _ in quantized_layers(q)] == ["fc", "head"]
    assert q.fc.weight_quant.bits == 8 and q.fc.input_quant.signed  # first layer; one call sees the signed input


def test_integer_engine_and_vnq_refuse_the_new_layers_by_name():
    torch.manual_seed(0)
    model, x = _conv1d_net(), torch.randn(2, 3, 32)
    q = quantize(model, Recipe(w_bits=8, a_bits=8, first_last="same"))
    with torch.no_grad(), calibrating(q):
        q(x)
    with pytest.raises(ValueError, match=r"module '0' \(QConv1d\) is not supported by the integer engine"):
        to_integer(q.eval(), x)
    with pytest.raises(ValueError, match=r"layer '0' \(Conv1d\) cannot be quantized by method 'vnq'.*skip: true"):
        quantize(model, Recipe(method="vnq", w_bits=2, a_bits=None, first_last="same"))


def test_attention_is_refused_by_name_and_can_be_skipped():
    """MultiheadAttention projects inside one module (its out_proj Linear is never called): not silently float."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.embed(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0].mean(dim=1))

    with pytest.raises(ValueError, match=r"layer 'attn' \(MultiheadAttention\) cannot be quantized.*"
                                         r"\{pattern: 'attn', skip: true\}"):
        quantize(Attn(), Recipe())
    q = quantize(Attn(), Recipe(overrides=[{"pattern": "attn", "skip": True}]))
    assert [n for n, _ in quantized_layers(q)] == ["embed", "head"] and type(q.attn) is nn.MultiheadAttention


def test_uniform_act_grid_symmetric_gives_signed_zero_point_free_activations():
    """``params: {act_grid: symmetric}``: every activation grid (ReLU outputs included) signed, symmetric, zero
    point 0 (TensorRT's int8 rule); the engine stays exact; a wrong value is refused by name."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3).eval()
    q = quantize(model, {"method": "uniform", "first_last": "8bit", "params": {"act_grid": "symmetric"}}).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), calibrating(q):
        q(x)
    acts = [m for n, m in q.named_modules() if n.endswith(("input_quant", "out_quant"))]
    assert len(acts) > 20
    for a in acts:
        g = a.grid()
        assert g.signed and int(g.zero_point) == 0 and (g.qmin, g.qmax) == (-128, 127)
    from qcnn.integer.agreement import compare_codes, simulation_codes

    _, sim = simulation_codes(q, x, dtype=torch.float64)
    assert compare_codes(to_integer(q, x).run(x, record=True)[1], sim)["equal"] == 1.0
    with pytest.raises(ValueError, match="act_grid='sym'"):
        quantize(build_model("resnet20", num_classes=10, in_channels=3), {"method": "uniform",
                                                                            "params": {"act_grid": "sym"}})

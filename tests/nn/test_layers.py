"""QConv1d and QConvTranspose2d: the float layer's function without quantizers, the quantized weight's grid (one
scale per output channel, axis 1 of a transposed conv's stored weight), the conv-layout helpers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcnn.nn.layers import (
    QUANT_LAYERS,
    QUANTIZED_LAYERS,
    QConv1d,
    QConv2d,
    QConvTranspose2d,
    QLinear,
    conv_to_transposed_layout,
    transposed_to_conv_layout,
)
from qcnn.quant.uniform import UniformQuantizer


def _wq():
    return UniformQuantizer(8, signed=True, symmetric=True, per_channel=True, dynamic=True)


def test_registry_maps_every_float_layer():
    assert QUANT_LAYERS == {nn.Conv1d: QConv1d, nn.Conv2d: QConv2d, nn.ConvTranspose2d: QConvTranspose2d,
                            nn.Linear: QLinear}
    assert set(QUANTIZED_LAYERS) == set(QUANT_LAYERS.values())
    assert all(issubclass(q, f) for f, q in QUANT_LAYERS.items())


def test_qconv1d_without_quantizers_is_the_float_layer():
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    q = QConv1d.from_float(conv)
    assert q.weight is conv.weight and q.bias is conv.bias  # the same parameters (state_dict keys too)
    assert list(q.state_dict()) == list(conv.state_dict())
    x = torch.randn(3, 4, 11)
    assert torch.equal(q(x), conv(x))


def test_qconv1d_weight_on_a_per_output_channel_grid():
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]).reshape(5, 1, 1))
    q = QConv1d.from_float(conv, weight_quant=_wq())
    x = torch.randn(2, 3, 9)
    wq = q.quantized_weight()
    g = q.weight_quant.grid()
    assert g.axis == 0 and g.scale.shape == (5,)
    torch.testing.assert_close(g.scale, conv.weight.detach().abs().amax(dim=(1, 2)) / 127)
    codes = wq / g.scale.reshape(5, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127.5
    torch.testing.assert_close(q(x), F.conv1d(x, wq, conv.bias, padding=1))


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_conv_layout_is_the_output_channel_major_weight(groups):
    """Row ``o`` of the conv layout is exactly what output channel ``o`` of the transposed conv is made of."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(6, 12, 3, stride=2, padding=1, bias=False, groups=groups)
    wc = transposed_to_conv_layout(ct.weight.detach(), groups)
    assert wc.shape == (12, 6 // groups, 3, 3)
    assert torch.equal(conv_to_transposed_layout(wc, groups), ct.weight.detach())
    x = torch.randn(1, 6, 4, 4)
    for o in range(12):
        only = torch.zeros_like(wc)
        only[o] = wc[o]
        y = F.conv_transpose2d(x, conv_to_transposed_layout(only, groups), None, 2, 1, 0, groups)
        assert (y.abs().sum(dim=(0, 2, 3)) > 0).nonzero().flatten().tolist() == [o]


def test_qconv_transpose2d_without_quantizers_is_the_float_layer():
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    q = QConvTranspose2d.from_float(ct)
    assert q.weight is ct.weight and q.output_padding == ct.output_padding
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(q(x), ct(x))
    assert torch.equal(q(x, output_size=[10, 10]), ct(x, output_size=[10, 10]))


def test_qconv_transpose2d_weight_scale_per_output_channel_is_axis_1():
    """The stored weight is ``(in, out, kH, kW)``: one scale per output channel means one per slice of axis 1,
    not per input channel (axis 0)."""
    torch.manual_seed(0)
    ct = nn.ConvTranspose2d(3, 4, 3, stride=2)
    with torch.no_grad():
        ct.weight.mul_(torch.tensor([0.01, 1.0, 10.0, 100.0]).reshape(1, 4, 1, 1))
    q = QConvTranspose2d.from_float(ct, weight_quant=_wq())
    wq = q.quantized_weight()
    assert wq.shape == ct.weight.shape
    scale = q.weight_quant.grid().scale
    torch.testing.assert_close(scale, ct.weight.detach().abs().amax(dim=(0, 2, 3)) / 127)
    codes = wq / scale.reshape(1, 4, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127.5
    # the smallest channel keeps 127 levels: it would be all zeros on a per-input-channel grid
    assert torch.unique(wq[:, 0]).numel() > 10
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(q(x), F.conv_transpose2d(x, wq, ct.bias, stride=2))
    with torch.no_grad():
        rel = (q(x) - ct(x)).norm() / ct(x).norm()
    assert 0 < rel < 0.01

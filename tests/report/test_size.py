import torch
from torch import nn

from qcnn import Recipe, calibrating, quantize
from qcnn.report.size import count_macs, layer_costs, model_size_bytes, summarize


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


def _quantized(first_last="same"):
    torch.manual_seed(0)
    q = quantize(Tiny(), Recipe(w_bits=4, a_bits=6, first_last=first_last))
    x = torch.randn(2, 1, 8, 8)
    with calibrating(q):
        q(x)
    return q, x


def test_macs_counted_per_image():
    q, x = _quantized()
    macs = count_macs(q, x)
    assert macs == {"conv": 4 * 6 * 6 * 9, "fc": 144 * 10}


def test_size_and_bops_follow_bit_widths():
    q, x = _quantized()
    costs = {c.name: c for c in layer_costs(q, x)}
    assert (costs["conv"].w_bits, costs["conv"].a_bits) == (4, 6)
    assert costs["fc"].bops == 1440 * 4 * 6
    expected_bits = 36 * 4 + 1440 * 4 + (4 + 10) * 32
    assert model_size_bytes(q) == expected_bits / 8
    s = summarize(q, x)
    assert s["bops"] == 1296 * 4 * 6 + 1440 * 4 * 6
    assert abs(s["compression"] - (36 + 1440 + 14) * 32 / expected_bits) < 1e-9


def test_fp32_first_last_counts_32_bits():
    q, x = _quantized("fp32")
    assert model_size_bytes(q) == (36 + 1440 + 14) * 4

"""Per-layer histograms of the report: one figure per layer, both axes labelled, the grid's levels drawn."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.models import build_model
from qcnn.report.histograms import plot_layer_histograms


def test_histograms_have_labelled_axes_and_the_levels(tmp_path, monkeypatch):
    saved = []
    original = Figure.savefig

    def keep(self, *a, **k):
        saved.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    torch.manual_seed(0)
    q = quantize(build_model("lenet5", num_classes=10, in_channels=1).eval(),
                 {"method": "uniform", "w_bits": 4, "a_bits": 4, "first_last": "same"}).eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad(), calibrating(q):
        q(x)
    paths = plot_layer_histograms(q, x, tmp_path)
    assert len(paths) == len(saved) == 5 and all(p.stat().st_size > 1000 for p in paths)
    for fig in saved:
        for ax in fig.axes:
            assert ax.get_xlabel().startswith("value") and ax.get_ylabel() == "count (log scale)"
            assert "levels" in ax.get_title()
            assert len(ax.lines) >= 2  # the grid's levels as vertical lines

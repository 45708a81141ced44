"""The Pareto plot (PNG written atomically, from a search result or plain points) and the bits table."""

from __future__ import annotations

import pytest

from qcnn.report.pareto import bits_table_md, plot_pareto

POINTS = [  # a greedy path of three layers: sizes in bytes, measured SQNR on two of them
    {"size": 4096.0, "bops": 3.0e9, "predicted_sqnr_db": 30.0, "sqnr_db": 30.0, "bits": {}, "chosen": False},
    {"size": 3072.0, "bops": 2.0e9, "predicted_sqnr_db": 25.0, "sqnr_db": None, "bits": {}, "chosen": False},
    {"size": 2048.0, "bops": 1.0e9, "predicted_sqnr_db": 18.0, "sqnr_db": 17.5, "bits": {}, "chosen": True},
]


class _Result:  # duck-typed MixedPrecisionResult
    bits = {"conv1": (8, 8), "layer.0": (4, 8), "fc": (6, None)}
    sensitivity = {"layer.0": {8: -30.0, 6: -28.5, 4: -22.25}, "fc": {8: -30.0, 6: -29.0, 4: -12.0}}
    params = {"conv1": 432, "layer.0": 2304, "fc": 640}
    candidates = (8, 6, 4)
    metric = "sqnr"
    pareto = POINTS
    budget, budget_kind = 2500.0, "size"


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(path.parent.glob(f".{path.name}.*"))  # no temporary file left behind
    return data


@pytest.mark.parametrize("x", ["size", "bops"])
def test_plot_pareto_writes_a_png(tmp_path, x):
    assert plot_pareto(_Result(), tmp_path / "p.png", "ResNet-20 0.6x", x=x) == tmp_path / "p.png"
    _png(tmp_path / "p.png")


def test_plot_pareto_takes_plain_points_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "curve.png"
    first = _png(plot_pareto(POINTS, path, "points"))
    second = _png(plot_pareto(POINTS[:2], path, "fewer points"))
    assert first != second


def test_plot_pareto_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'latency'"):
        plot_pareto(POINTS, tmp_path / "p.png", "t", x="latency")
    with pytest.raises(ValueError, match="no Pareto points"):
        plot_pareto([], tmp_path / "p.png", "t")
    assert not (tmp_path / "p.png").exists()


def test_bits_table_has_one_row_per_layer():
    md = bits_table_md(_Result())
    lines = md.strip().splitlines()
    assert lines[0] == "| layer | w bits | a bits | params | -SQNR dB @ w8 | -SQNR dB @ w6 | -SQNR dB @ w4 |"
    assert len(lines) == 2 + 3
    assert lines[2] == "| conv1 | 8 | 8 | 432 | - | - | - |"  # kept: no sensitivity
    assert lines[3] == "| layer.0 | 4 | 8 | 2304 | -30 | -28.5 | -22.25 |"
    assert lines[4] == "| fc | 6 | - | 640 | -30 | -29 | -12 |"


def test_bits_table_from_a_real_search():
    from qcnn.methods.mixed_precision import sensitivity_search
    from tests.methods.test_mixed_precision import _small_data, _small_net, _small_q

    net, data = _small_net(), _small_data()
    r = sensitivity_search(_small_q(net, data), net, data, "0.6x", kind_metric="mse")
    lines = bits_table_md(r).strip().splitlines()
    assert len(lines) == 2 + len(r.bits) == 7
    assert "logit MSE @ w4" in lines[0]
    for line, (name, (wb, ab)) in zip(lines[2:], r.bits.items()):
        assert line.startswith(f"| {name} | {wb} | {ab} | {r.params[name]} |")

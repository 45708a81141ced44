"""Mixed precision by measured sensitivity: budget parsing, a small CNN with one outlier-ridden layer, the
impossible budget, keep / activation options, and ResNet-20 (real weights, real CIFAR-10 calibration images)
under a 0.6x size budget against uniform 5- and 4-bit weights."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from qcnn.methods.mixed_precision import (
    MixedPrecisionResult,
    apply_bits,
    logit_sqnr_db,
    parse_budget,
    sensitivity_search,
)
from qcnn.methods.place import quantize
from qcnn.methods.ptq import calibrate_with_histograms, recipe_of
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.recipes import Recipe

SMALL = Recipe(method="uniform", w_bits=8, a_bits=8, first_last="same", per_channel=False)
SENSITIVE = "2"  # the 16 -> 8 conv, 1152 of the 13424 weights, with one weight 30x the others' max


@pytest.mark.parametrize("text, expected", [
    ("size:1.2MB", ("size", 1.2e6)),
    ("size:300KB", ("size", 300_000.0)),
    ("size:300KiB", ("size", 307_200.0)),
    ("size: 300 kib", ("size", 307_200.0)),
    ("size:250000", ("size", 250_000.0)),
    ("size:512B", ("size", 512.0)),
    ("2MiB", ("size", 2 * 1024.0**2)),
    ("bops:2.5G", ("bops", 2.5e9)),
    ("bops:40m", ("bops", 4e7)),
    ("bops:1e9", ("bops", 1e9)),
    ("0.5x", ("size_x", 0.5)),
    ("size:0.6x", ("size_x", 0.6)),
    ("bops:.25X", ("bops_x", 0.25)),
])
def test_parse_budget(text, expected):
    kind, value = parse_budget(text)
    assert kind == expected[0] and value == pytest.approx(expected[1], rel=1e-12)


@pytest.mark.parametrize("text", ["", "size:", "size:-1KB", "size:0", "0x", "size:3 parsecs", "bops:2.5GB",
                                  "size:2.5G", "weight:3MB", "250000", "abc", "size:1.2.3MB", "nanx"])
def test_parse_budget_refuses_bad_text_by_name(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_budget(text)


def _small_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # per-tensor grid: the outlier sets the step, low bits zero the rest of the layer
        net[2].weight[0, 0, 1, 1] = 30 * net[2].weight.abs().max()
    return net


def _small_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 3, 8, 8, generator=g) for _ in range(2)]


def _small_q(net, data):
    q = quantize(net, SMALL).eval()
    calibrate_with_histograms(q, [(x, None) for x in data], record=False)
    return q


def _sqnr_of(net, data, bits):
    q = _small_q(net, data)
    apply_bits(q, bits)
    return logit_sqnr_db(q, net, data)


def test_small_cnn_keeps_the_sensitive_layer_at_8_bits():
    net, data = _small_net(), _small_data()
    q = _small_q(net, data)
    r = sensitivity_search(q, net, data, "0.6x")
    assert isinstance(r, MixedPrecisionResult) and r.budget_kind == "size"
    assert r.budget == pytest.approx(0.6 * 13424) and r.achieved <= r.budget
    # the measurement sees the outlier: at 6 bits the sensitive layer costs the most, by > 5 dB
    at6 = {n: d[6] for n, d in r.sensitivity.items()}
    assert max(at6, key=at6.get) == SENSITIVE
    assert at6[SENSITIVE] > sorted(at6.values())[-2] + 5.0
    assert r.bits[SENSITIVE] == (8, 8)
    assert sum(wb < 8 for wb, _ in r.bits.values()) >= 2
    chosen = {n: wb for n, (wb, _) in r.bits.items()}
    assert r.achieved == sum(r.params[n] * b / 8 for n, b in chosen.items())
    # applied in place; the recorded SQNR is the model's
    assert logit_sqnr_db(q, net, data) == pytest.approx(r.sqnr_db, abs=1e-9)
    assert {o.pattern: o.w_bits for o in recipe_of(q, SMALL).overrides} == chosen
    # beats lowering the sensitive layer instead (smaller by 576 B) and uniform 4-bit (smaller) and 5-bit (larger)
    assert r.sqnr_db > _sqnr_of(net, data, {**chosen, SENSITIVE: 4}) + 3.0
    assert r.sqnr_db > _sqnr_of(net, data, {n: 4 for n in chosen}) + 5.0
    assert r.sqnr_db > _sqnr_of(net, data, {n: 5 for n in chosen}) + 2.0


def test_pareto_path_and_measured_points():
    net, data = _small_net(), _small_data()
    r = sensitivity_search(_small_q(net, data), net, data, "size:9000", measure_points=4)
    path = [p for p in r.pareto if p["on_path"]]
    sizes = [p["size"] for p in path]
    assert sizes[0] == 13424 and sizes[-1] == 13424 / 2  # all at 8 bits ... all at 4 bits
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert all(a > b for a, b in zip([p["bops"] for p in path], [p["bops"] for p in path][1:]))
    measured = [p for p in r.pareto if p["sqnr_db"] is not None]
    assert len([p for p in measured if p["on_path"]]) == 4 and sum(p["chosen"] for p in r.pareto) == 1
    assert path[0]["sqnr_db"] is not None and path[-1]["sqnr_db"] is not None
    assert path[0]["sqnr_db"] > path[-1]["sqnr_db"] + 15.0
    assert max(abs(p["sqnr_db"] - p["predicted_sqnr_db"]) for p in measured) < 3.0
    assert path[0]["predicted_sqnr_db"] == pytest.approx(path[0]["sqnr_db"])  # the start is N_0 itself
    assert r.achieved <= 9000 and r.achieved > 9000 - 2304 / 2  # refilled: no layer raise fits anymore


def test_bops_budget_keep_and_activation_bits():
    net, data = _small_net(), _small_data()
    q = _small_q(net, data)
    full = sensitivity_search(_small_q(net, data), net, data, "bops:1x")
    bops_8 = full.achieved
    r = sensitivity_search(q, net, data, "bops:0.5x", keep={"0", "10"}, act_bits_fixed=False,
                           kind_metric="mse")
    assert r.budget_kind == "bops" and r.budget == pytest.approx(0.5 * bops_8) and r.achieved <= r.budget
    assert r.bits["0"] == (8, 8) and r.bits["10"] == (8, 8)
    assert set(r.sensitivity) == {"2", "4", "6"} and all(v[8] > 0 for v in r.sensitivity.values())
    mods = dict(q.named_modules())
    for n, (wb, ab) in r.bits.items():
        assert ab == wb and mods[n].weight_quant.bits == wb and mods[n].input_quant.bits == ab
    assert r.achieved == sum(r.macs[n] * wb * ab for n, (wb, ab) in r.bits.items())
    assert min(wb for wb, _ in r.bits.values()) < 8


def test_impossible_budget_states_the_minimum():
    net, data = _small_net(), _small_data()
    with pytest.raises(ValueError, match=r"below the minimum achievable size 6712 bytes"):
        sensitivity_search(_small_q(net, data), net, data, "size:6KB")
    with pytest.raises(ValueError, match=r"minimum achievable size 7288 bytes"):  # 1152 + 12272 / 2
        sensitivity_search(_small_q(net, data), net, data, ("size", 7000), keep={SENSITIVE})
    with pytest.raises(ValueError, match="'nope'"):
        sensitivity_search(_small_q(net, data), net, data, "0.6x", keep={"nope"})
    with pytest.raises(ValueError, match="kind_metric"):
        sensitivity_search(_small_q(net, data), net, data, "0.6x", kind_metric="kl")
    with pytest.raises(ValueError, match="bit candidate=0"):
        sensitivity_search(_small_q(net, data), net, data, "0.6x", candidates=(8, 0))


@pytest.fixture
def one_thread():
    """One intra-op thread (about 15 s instead of 40+ s for two threads on two busy shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resnet20_under_a_0p6x_size_budget(cifar_zip, weights_dir, one_thread):
    from qcnn.data import get_data
    from qcnn.models import build_model, load_weights

    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=64, augment=False, calib_size=64)
    batches, held_out = list(bundle.calib), [next(iter(bundle.test))]  # 64 calibration / 64 test images
    model = load_weights(build_model("resnet20"), weights_dir / "resnet20-12fca82f.th").eval()
    recipe = Recipe(method="uniform", w_bits=8, a_bits=8, first_last="same", fold_bn=True)

    def fresh():
        q = quantize(model, recipe).eval()
        calibrate_with_histograms(q, batches, record=False)
        return q

    q = fresh()
    r = sensitivity_search(q, model, batches, "0.6x", candidates=(8, 6, 5, 4))
    layers = [n for n, m in q.named_modules() if isinstance(m, (QConv2d, QLinear))]
    size_8 = sum(dict(q.named_modules())[n].weight.numel() for n in layers)  # bytes at 8 bits
    assert len(r.bits) == len(layers) == 20 and r.achieved <= 0.6 * size_8
    sizes = [p["size"] for p in r.pareto if p["on_path"]]
    assert sizes[0] == size_8 and all(a > b for a, b in zip(sizes, sizes[1:]))
    assert logit_sqnr_db(q, model, batches) == pytest.approx(r.sqnr_db, abs=1e-9)
    w5, w4 = fresh(), fresh()
    apply_bits(w5, {n: 5 for n in layers})  # 0.625x: larger than the budget
    apply_bits(w4, {n: 4 for n in layers})  # 0.5x
    # measured (calibration images / held-out test images): chosen at 0.5997x 18.33 / 18.41 dB, uniform W5
    # 16.53 / 16.04 dB, W4 10.38 / 10.39 dB (W8: 30.18 dB)
    for data in (batches, held_out):
        s, s5, s4 = (logit_sqnr_db(m, model, data) for m in (q, w5, w4))
        assert s > s5 + 1.0, (s, s5)
        assert s > s4 + 6.0, (s, s4)


def test_qcode_search_and_frozen_grids():
    net, data = _small_net(), _small_data()
    recipe = Recipe(method="qcode", w_bits=8, a_bits=8, first_last="same", per_channel=False, fold_bn=True)
    q = quantize(net, recipe).eval()
    calibrate_with_histograms(q, [(x, None) for x in data], record=False)
    r = sensitivity_search(q, net, data, "0.6x")
    assert r.achieved <= r.budget and r.bits[SENSITIVE][0] == 8
    mods = dict(q.named_modules())
    assert all(mods[n].weight_quant.bits == wb for n, (wb, _) in r.bits.items())
    assert logit_sqnr_db(q, net, data) == pytest.approx(r.sqnr_db, abs=1e-9)
    uq = _small_q(net, data)
    wq = dict(uq.named_modules())["4"].weight_quant
    if not hasattr(wq, "freeze"):
        pytest.skip("UniformQuantizer.freeze is not available")
    wq.freeze()
    with pytest.raises(ValueError, match="layer '4'.*frozen"):
        sensitivity_search(uq, net, data, "0.6x")
    assert sensitivity_search(uq, net, data, "0.7x", keep={"4"}).bits["4"][0] == 8


def test_a_failed_search_leaves_the_model_as_given():
    net, data = _small_net(), _small_data()
    q = _small_q(net, data)
    before = logit_sqnr_db(q, net, data)
    calls = []

    def log(msg):  # fails in the middle of the sensitivity measurement
        calls.append(msg)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sensitivity_search(q, net, data, "0.6x", log=log)
    assert all(m.weight_quant.bits == 8 for m in q.modules() if isinstance(m, (QConv2d, QLinear)))
    assert logit_sqnr_db(q, net, data) == before

"""Post-training quantization: fl window search, accuracy-aware bit search, bad input, and ResNet-20
8-bit QCode accuracy on a slice of the real CIFAR-10 (JPEG) test set."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from qcnn.methods import quantize
from qcnn.methods.ptq import best_weight_fl, post_training_quantize, recipe_of, top1
from qcnn.quant.fixed_point import FixedPointQuantizer, fixed_point_quant
from qcnn.recipes import Recipe


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 4)).eval()


def _data(n=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return [(x[i : i + 64], torch.zeros(64, dtype=torch.long)) for i in range(0, n, 64)]


def test_weight_fl_search_is_the_window_argmin():
    torch.manual_seed(0)
    w = torch.randn(16, 9) * 0.3
    w[0, 0] = 3.0  # an outlier: the MSE-optimal fl clips it
    q = FixedPointQuantizer(4)
    fl = int(best_weight_fl(q, w, "mse", 3))
    fl0 = 4 - 1 - 2  # ceil(log2 3) = 2
    errs = {f: float(((fixed_point_quant(w, torch.tensor(f), -8, 7) - w) ** 2).sum()) for f in range(fl0 - 3, fl0 + 4)}
    assert fl == min(errs, key=errs.get) and fl > fl0


def test_greedy_search_lowers_error_and_round_trips():
    model, data = _net(), _data()
    base = post_training_quantize(model, Recipe(method="qcode", w_bits=4, a_bits=4, first_last="same",
                                                per_channel=False, calib_images=128), data).model
    greedy = post_training_quantize(model, Recipe(method="qcode", w_bits=4, a_bits=4, first_last="same",
                                                  per_channel=False, calib_images=128), data, search="greedy").model
    x = data[-1][0]
    with torch.no_grad():
        ref = model(x)
        e_base, e_greedy = float(((base(x) - ref) ** 2).mean()), float(((greedy(x) - ref) ** 2).mean())
    assert e_greedy < e_base
    fresh = quantize(model, Recipe(method="qcode", w_bits=4, a_bits=4, first_last="same", per_channel=False,
                                   fold_bn=True)).eval()
    fresh.load_state_dict(greedy.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), greedy(x))


def test_accuracy_search_respects_max_drop_and_rebuilds():
    model, data = _net(2), _data(512, 3)
    with torch.no_grad():  # labels = the float model's own predictions: float top-1 is 100
        data = [(x, model(x).argmax(1)) for x, _ in data]
    recipe = Recipe(method="qcode", w_bits=8, a_bits=8, first_last="same", per_channel=False, calib_images=128)
    res = post_training_quantize(model, recipe, data, search="accuracy", max_drop=5.0, eval_images=512)
    assert res.float_calib_top1 == 100.0
    assert res.calib_top1 >= 95.0
    assert all(s["top1"] >= 95.0 for s in res.steps if s["kept"])
    assert all(s["top1"] < 95.0 for s in res.steps if not s["kept"])
    bits = {o.pattern: (o.w_bits, o.a_bits) for o in res.recipe.overrides}
    assert set(bits) == {"0", "5"} and min(b for wa in bits.values() for b in wa) < 8  # something got cheaper
    rebuilt = quantize(model, res.recipe).eval()
    rebuilt.load_state_dict(res.model.state_dict())
    assert top1(rebuilt, data) == top1(res.model, data)
    assert recipe_of(res.model, recipe).overrides == res.recipe.overrides


def _deep_net(seed=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(32, 4)).eval()


def test_accuracy_search_keeps_the_first_last_policy():
    """``first_last="8bit"`` fixes the first and last layers at 8 bits: the search lowers only the others
    (it used to lower the classifier to 6 bits and the first layer's activations to 4)."""
    model, data = _deep_net(), _data(512, 3)
    with torch.no_grad():
        data = [(x, model(x).argmax(1)) for x, _ in data]
    recipe = Recipe(method="qcode", w_bits=8, a_bits=8, first_last="8bit", per_channel=False, calib_images=128)
    res = post_training_quantize(model, recipe, data, search="accuracy", max_drop=100.0, eval_images=256)
    bits = {o.pattern: (o.w_bits, o.a_bits) for o in res.recipe.overrides}
    assert bits["0"] == (8, 8) and bits["8"] == (8, 8)
    assert bits["2"] == bits["4"] == (4, 4)  # an unlimited budget takes the others to the lowest candidate
    assert {s["layer"] for s in res.steps} == {"2", "4"}
    same = post_training_quantize(model, dataclasses.replace(recipe, first_last="same"), data, search="accuracy",
                                  max_drop=100.0, eval_images=256)
    assert {s["layer"] for s in same.steps} == {"0", "2", "4", "8"}


def _relu6_net(seed=5):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight[:4].mul_(20)  # unequal channel ranges, activations above 6
    return net.eval()


def test_equalized_checkpoint_rebuilds_the_same_model():
    """``ptq.equalize`` is structural (ReLU6 between equalized layers -> per-channel clamps, every layer with a
    bias): ``quantize(model, result.recipe)`` + the saved state reproduce the PTQ result exactly; the integer
    engine refuses the clamps with the remedy named."""
    from qcnn.integer import to_integer
    from qcnn.nn.layers import ChannelClamp

    model, data = _relu6_net(), _data(256, 2)
    recipe = Recipe(method="qcode", w_bits=8, a_bits=8, first_last="same", per_channel=False, calib_images=128,
                    ptq={"equalize": True, "bias_correction": "empirical"})
    res = post_training_quantize(model, recipe, data)
    assert sum(isinstance(m, ChannelClamp) for m in res.model.modules()) == 2
    assert set(res.ptq_steps) == {"quantize+equalize", "absorb_bias", "calibrate", "freeze_weight_grids",
                                  "bias_correction"}
    rebuilt = quantize(model, res.recipe).eval()
    rebuilt.load_state_dict(res.model.state_dict())
    x = data[-1][0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), res.model(x))
    with pytest.raises(ValueError, match="equalize_relu6 'relu'"):
        to_integer(res.model, x[:1])
    relu = post_training_quantize(model, recipe.replace(ptq={"equalize_relu6": "relu"}), data).model
    assert not any(isinstance(m, ChannelClamp) for m in relu.modules())
    to_integer(relu, x[:1])  # the ReLU form runs integer-only


def test_learned_rounding_options_reach_adaround_and_are_recorded():
    """``round_lr`` and ``round_act_lr`` change what the rounding learns: an explicit step equal to the default
    gives the default's model, another step another model; learned activation steps are counted in the step
    record."""
    from qcnn.methods.adaround import default_lr

    model, data = _net(3), _data(128, 4)
    base = Recipe(method="uniform", w_bits=3, a_bits=4, first_last="same", calib_images=128,
                  ptq={"round": "brecq", "round_iterations": 40})
    states = {}
    for key, extra in {"default": {}, "same": {"round_lr": default_lr(40)}, "small": {"round_lr": 1e-3},
                       "act": {"round_act_lr": 1e-3}}.items():
        res = post_training_quantize(model, base.replace(ptq=extra), data)  # merged into base.ptq
        states[key] = res.model.state_dict()
        if key == "act":
            assert res.ptq_steps["brecq"]["act_steps"] == 2  # the conv's and the linear's input steps
        else:
            assert "act_steps" not in res.ptq_steps["brecq"]
    same = all(torch.equal(v, states["same"][k]) for k, v in states["default"].items())
    differ = {k: not all(torch.equal(v, states[k][n]) for n, v in states["default"].items()) for k in ("small", "act")}
    assert same and differ == {"small": True, "act": True}


def test_bias_correction_after_learned_rounding_keeps_the_rounding():
    """After learned rounding, bias correction's reference is the float function of the rounded weights: it
    removes what activation quantization shifts, not the rounding's own choices. With float activations it has
    nothing left to correct (the biases stay those of the rounding), where after nearest rounding it corrects the
    weights' mean error."""
    model, data = _net(5), _data(128, 6)
    base = Recipe(method="uniform", w_bits=3, a_bits=None, first_last="same", calib_images=128,
                  ptq={"round": "adaround", "round_iterations": 40})
    rounded = post_training_quantize(model, base, data)
    corrected = post_training_quantize(model, base.replace(ptq={"bias_correction": "empirical"}), data)
    assert corrected.ptq_steps["bias_correction"]["max_shift"] < 1e-5
    for name, v in rounded.model.state_dict().items():
        assert torch.allclose(v, corrected.model.state_dict()[name], atol=1e-5), name
    nearest = post_training_quantize(model, base.replace(ptq={"round": "nearest", "bias_correction": "empirical"}),
                                     data)
    assert nearest.ptq_steps["bias_correction"]["max_shift"] > 1e-3
    with_acts = post_training_quantize(model, base.replace(a_bits=4, ptq={"bias_correction": "empirical"}), data)
    assert with_acts.ptq_steps["bias_correction"]["max_shift"] > 1e-4


def test_bad_input():
    model, data = _net(), _data()
    with pytest.raises(ValueError, match="empty"):
        post_training_quantize(model, Recipe(method="qcode"), [])
    bad = [(torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="NaN"):
        post_training_quantize(model, Recipe(method="qcode"), bad)
    with pytest.raises(ValueError, match="'sideways'"):
        post_training_quantize(model, Recipe(method="qcode"), data, search="sideways")
    with pytest.raises(ValueError, match="needs method 'qcode'"):
        post_training_quantize(model, Recipe(method="uniform"), data, search="greedy")
    with pytest.raises(ValueError, match="'l1'"):
        post_training_quantize(model, Recipe(method="qcode"), data, search="greedy", metric="l1")
    with pytest.raises(ValueError, match="bit candidate=0"):
        post_training_quantize(model, Recipe(method="qcode"), data, search="accuracy", bit_candidates=(8, 0))


def test_resnet20_8bit_qcode_on_real_cifar(cifar_zip, weights_dir):
    from qcnn.data import get_data, subset
    from qcnn.models import build_model, load_weights

    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=500, augment=False, calib_size=500)
    test = list(subset(bundle.test, 2000))
    model = load_weights(build_model("resnet20"), weights_dir / "resnet20-12fca82f.th").eval()
    recipe = Recipe(method="qcode", w_bits=8, a_bits=8, first_last="same", per_channel=False, calib="percentile",
                    calib_images=500)
    q = post_training_quantize(model, recipe, bundle.calib).model
    f, a = top1(model, test), top1(q, test)
    assert f > 78.0
    assert abs(f - a) <= 0.5, (f, a)


def test_calib_augment_feeds_the_views_to_the_steps():
    """``calib_augment: K`` calibrates the steps on (2 + K) views of each calibration image: recorded in the
    steps, a different learned rounding than the images alone, and refused below 0."""
    model, data = _net(3), _data(64, 4)
    base = Recipe(method="uniform", w_bits=3, a_bits=4, first_last="same", calib_images=64,
                  ptq={"round": "adaround", "round_iterations": 30})
    plain = post_training_quantize(model, base, data)
    more = post_training_quantize(model, base.replace(ptq={"calib_augment": 2}), data)
    assert more.ptq_steps["calib_augment"]["images"] == 64 * 4 and "calib_augment" not in plain.ptq_steps
    assert "calib_augment:2" in more.recipe.ptq.steps
    w = {k: r.model.get_submodule("0").weight for k, r in (("plain", plain), ("more", more))}
    assert not torch.equal(w["plain"], w["more"])
    with pytest.raises(ValueError, match="calib_augment=-1"):
        Recipe(ptq={"calib_augment": -1})

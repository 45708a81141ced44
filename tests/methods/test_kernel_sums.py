"""DC-preserving rounding (qcnn.methods.kernel_sums): sums kept, least error for that, real-data gain."""

import copy
import itertools

import pytest
import torch
from torch import nn

from qcnn.calib import calibrating
from qcnn.methods import quantize
from qcnn.methods.adaround import adaround
from qcnn.methods.kernel_sums import keep_kernel_sums, sum_moves
from qcnn.models import build_model, load_weights
from qcnn.nn.layers import QConv2d
from qcnn.recipes import PTQSpec, Recipe
from qcnn.transform import float_twin


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.pw(torch.relu(self.dw(torch.relu(self.conv(x)))))


def _qnet(bits=3, per_channel=True, seed=0):
    torch.manual_seed(seed)
    net = _Net().eval()
    recipe = Recipe(method="uniform", per_channel=per_channel, w_bits=bits, a_bits=16, calib="minmax",
                    first_last="same", fold_bn=True)
    q = quantize(net, recipe).eval()
    x = torch.randn(8, 3, 12, 12)
    with calibrating(q):
        q(x)
    return q, x


def _codes(m: QConv2d):
    g = m.weight_quant.grid()
    shape = [-1, 1, 1, 1] if g.scale.dim() > 0 else []
    s = g.scale.reshape(shape)
    z = g.zero_point.reshape(shape).float()
    return m.weight.detach() / s + z, s, z, g


def test_sums_within_half_a_step_and_least_squared_error():
    """Every 3x3 slice's code sum ends within half a step of its float sum (before: up to several steps), the
    weights sit on their grid, the 1x1 layer is untouched, and per slice no rounding to floor/ceil with a sum
    that close has a smaller squared error (brute force over the 2^9 choices)."""
    q, x = _qnet()
    v = {n: _codes(q.get_submodule(n))[0].clone() for n in ("conv", "dw")}
    pw_before = q.pw.weight.detach().clone()
    rep = keep_kernel_sums(q)
    assert set(rep.after) == {"conv", "dw"}
    assert min(rep.before.values()) > 0.5 and max(rep.after.values()) < 0.4  # mean |sum error|, steps
    assert torch.equal(q.pw.weight, pw_before)
    for n in ("conv", "dw"):
        m = q.get_submodule(n)
        codes, s, z, g = _codes(m)
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert torch.equal(m.weight_quant(m.weight), m.weight)
        c = codes.round().reshape(-1, 9)
        f = v[n].reshape(-1, 9)
        assert float((c.sum(1) - f.sum(1)).abs().max()) <= 0.5 + 1e-4
        for i in range(0, c.shape[0], 7):  # a sample of the slices
            lo, err = f[i].floor(), float(((c[i] - f[i]) ** 2).sum())
            options = [lo + torch.tensor(b) for b in itertools.product((0.0, 1.0), repeat=9)]
            options = [o for o in options if g.qmin <= float(o.min()) and float(o.max()) <= g.qmax]
            best = min(float(((o - f[i]) ** 2).sum()) for o in options if abs(float(o.sum() - f[i].sum())) <= 0.5)
            assert err <= best + 1e-4


def test_flat_input_error_is_bounded_by_half_a_step():
    """On a constant input the output error of a kept-sum layer is at most half a step times the input per
    slice; nearest rounding's is larger on this net."""
    q, _ = _qnet(per_channel=False)
    near = copy.deepcopy(q)
    keep_kernel_sums(q)
    mu = 1.7
    conv_f = float_twin(near).conv
    x = torch.full((1, 3, 9, 9), mu)
    ref = conv_f(x)[..., 4, 4]
    with torch.no_grad():
        e_keep = (float_twin(q).conv(x)[..., 4, 4] - ref).abs()
        wq = near.conv.weight_quant(near.conv.weight)
        e_near = (nn.functional.conv2d(x, wq, near.conv.bias, padding=1)[..., 4, 4] - ref).abs()
    step = float(q.conv.weight_quant.grid().scale)
    assert float(e_keep.max()) <= 3 * 0.5 * step * mu + 1e-5  # three input channels
    assert float(e_near.max()) > float(e_keep.max())


def test_sum_moves_takes_the_cheapest_allowed():
    v = torch.tensor([[0.4, 0.3, 0.45, 0.1]])  # sum 1.25, codes 0 -> one move up
    c = torch.zeros(1, 4)
    cost = 1 + 2 * (c - v)
    moves = sum_moves(v, c, cost, cost, torch.tensor([[True, True, False, True]]), torch.zeros(1, 4, dtype=bool))
    assert moves.tolist() == [[1.0, 0.0, 0.0, 0.0]]  # 0.45 is not allowed: 0.4 is next


def test_adaround_keep_dc_keeps_the_sums():
    """AdaRound with keep_dc: every 3x3 slice's sum within half a step of the float one (without: not), the
    1x1 layer rounds as without it."""
    q, x = _qnet()
    q2 = copy.deepcopy(q)
    floats = {n: _codes(q.get_submodule(n))[0].reshape(-1, 9).clone() for n in ("conv", "dw")}
    adaround(q, None, [x], iterations=60)
    adaround(q2, None, [x], iterations=60, keep_dc=True)
    worst = {}
    for name, m in (("plain", q), ("keep", q2)):
        worst[name] = max(float((_codes(m.get_submodule(n))[0].round().reshape(-1, 9).sum(1) - floats[n].sum(1))
                                .abs().max()) for n in floats)
    assert worst["keep"] <= 0.5 + 1e-4 < worst["plain"], worst


def test_recipe_and_cli_name_the_step():
    from qcnn.cli import build_parser
    from qcnn.commands.ptq import recipe_from_args

    assert "keep_dc" in PTQSpec(keep_dc=True, round="adaround").steps
    args = build_parser().parse_args(["ptq", "--keep-dc", "--model", "resnet20", "--dataset", "cifar10"])
    assert recipe_from_args(args).ptq.keep_dc is True
    with pytest.raises((TypeError, ValueError), match="keep_dc"):
        PTQSpec(keep_dc="yes")


@torch.no_grad()
def test_mobilenet_v2_qcode_gains_from_kept_sums(cifar_zip, weights_dir):
    """Pretrained MobileNetV2, per-tensor power-of-two QCode W8A8 (the survey's truncation), nearest rounding:
    keeping the depthwise and stem kernels' sums brings the logits closer to float by several dB (measured on
    these 16 CIFAR images at 96 px: 2.9 -> 7.2 dB; mean kernel-sum error 0.77 -> 0.27 steps in the worst layer)."""
    import torch.nn.functional as F

    from qcnn.data import get_data
    from qcnn.methods.ptq import post_training_quantize
    from qcnn.report.layers import sqnr_db

    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=16, augment=False, calib_size=16)
    x = F.interpolate(next(iter(bundle.calib))[0], size=96, mode="bilinear", align_corners=False)
    model = load_weights(build_model("tv:mobilenet_v2", num_classes=1000),
                         weights_dir / "mobilenet_v2-b0353104.pth").eval()
    base = dict(method="qcode", per_channel=False, w_bits=8, a_bits=8, calib="mse", first_last="same",
                params={"unsigned_acts": True}, calib_images=16)
    ref, out = model(x), {}
    for keep in (False, True):
        res = post_training_quantize(model, Recipe(**base, ptq={"keep_dc": keep}), [(x, torch.zeros(16))])
        out[keep] = sqnr_db(ref, res.model(x))
        if keep:
            assert res.ptq_steps["keep_dc"]["layers"] == 18
            assert res.ptq_steps["keep_dc"]["sum_error_after"] < 0.3 < res.ptq_steps["keep_dc"]["sum_error_before"]
    assert out[True] > out[False] + 3.0, out

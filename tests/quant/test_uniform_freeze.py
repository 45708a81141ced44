"""A frozen dynamic UniformQuantizer keeps its grid: the scale no longer follows the weight, the flag and the
scale round-trip through a state_dict, and a state_dict saved before ``frozen`` existed still loads."""

from __future__ import annotations

import torch

from qcnn.quant.uniform import UniformQuantizer


def _w(seed=0):
    return torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(seed))


def test_freeze_keeps_the_scale_when_the_weight_changes():
    for kw in ({"per_channel": True}, {"per_channel": False}, {"per_channel": True, "weight_range": "mse"}):
        q = UniformQuantizer(4, dynamic=True, **kw)
        w = _w()
        q(w)
        s = q.scale.clone()
        q.freeze()
        w2 = w * 3.0
        y = q(w2)
        assert torch.equal(q.scale, s) and bool(q.frozen)
        assert torch.equal(y, torch.fake_quantize_per_channel_affine(w2, s, torch.zeros(8, dtype=torch.int32), 0,
                                                                     -8, 7) if s.dim() else
                           torch.fake_quantize_per_tensor_affine(w2, s.reshape(1), torch.zeros(1, dtype=torch.int32),
                                                                 -8, 7))
        # without freeze the scale follows the weight
        d = UniformQuantizer(4, dynamic=True, **kw)
        d(w2)
        assert not torch.allclose(d.scale, s)


def test_frozen_state_dict_round_trip():
    q = UniformQuantizer(3, dynamic=True, per_channel=True, weight_range="mse")
    q(_w(1))
    q.freeze()
    fresh = UniformQuantizer(3, dynamic=True, per_channel=True, weight_range="mse")
    assert not bool(fresh.frozen) and not fresh._frozen
    fresh.load_state_dict(q.state_dict())
    assert bool(fresh.frozen) and fresh._frozen
    assert torch.equal(fresh.scale, q.scale)
    w = _w(2) * 5
    assert torch.equal(fresh(w), q(w))
    assert torch.equal(fresh.scale, q.scale)  # still frozen after a call


def test_old_state_dict_without_frozen_loads():
    q = UniformQuantizer(4, dynamic=True, per_channel=True)
    q(_w(3))
    old = {k: v for k, v in q.state_dict().items() if k != "frozen"}
    assert "frozen" in q.state_dict() and "frozen" not in old
    fresh = UniformQuantizer(4, dynamic=True, per_channel=True)
    fresh.freeze()
    res = fresh.load_state_dict(old)  # strict: no missing-key error
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert not bool(fresh.frozen) and not fresh._frozen
    w = _w(4) * 2
    fresh(w)
    ref = UniformQuantizer(4, dynamic=True, per_channel=True)
    ref(w)
    assert torch.equal(fresh.scale, ref.scale)  # dynamic again
    # inside a parent module too (prefixed keys)
    parent, src = torch.nn.Module(), torch.nn.Module()
    parent.q, src.q = UniformQuantizer(4, dynamic=True), UniformQuantizer(4, dynamic=True)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("frozen")}
    assert parent.load_state_dict(sd).missing_keys == []

"""TensorLoader: batches, determinism with a seed, per-epoch shuffles, DDP shards, take()."""

from __future__ import annotations

import math

import pytest
import torch

from qcnn.data import Normalize, TensorLoader

NORM = Normalize((0.0,), (1.0,))


def _loader(n=100, **kw):
    # image i is filled with the value i, so every output pixel tells which image it came from
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
    labels = torch.arange(n)
    kw.setdefault("batch_size", 16)
    return TensorLoader(images, labels, normalize=NORM, **kw)


def _epoch(loader):
    xs, ys = zip(*list(loader))
    return torch.cat(xs), torch.cat(ys)


def test_eval_loader_order_and_len():
    ld = _loader(100)
    assert len(ld) == 7 and ld.num_samples == 100
    x, y = _epoch(ld)
    assert y.tolist() == list(range(100))
    assert torch.allclose(x[:, 0, 0, 0] * 255, torch.arange(100).float())
    assert len(_loader(100, drop_last=True)) == 6


def test_shuffle_is_a_seeded_permutation_new_each_epoch():
    a, b, c = _loader(shuffle=True, seed=1), _loader(shuffle=True, seed=1), _loader(shuffle=True, seed=2)
    ya, yb, yc = _epoch(a)[1], _epoch(b)[1], _epoch(c)[1]
    assert sorted(ya.tolist()) == list(range(100))
    assert torch.equal(ya, yb) and not torch.equal(ya, yc)
    a.set_epoch(1)
    y1 = _epoch(a)[1]
    assert not torch.equal(y1, ya)
    a.set_epoch(0)
    assert torch.equal(_epoch(a)[1], ya)


def test_augmentation_deterministic_and_label_aligned():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    make = lambda: TensorLoader(images, torch.arange(64), batch_size=10, normalize=NORM, shuffle=True, pad=2,
                                flip=True, seed=5)
    a, b = make(), make()
    xa, ya = _epoch(a)
    xb, yb = _epoch(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(3)
    assert not torch.equal(_epoch(b)[0], xa)
    # each output is its labelled source image, shifted by at most 2 and maybe mirrored
    order, shifts, flips = a.plan()
    assert torch.equal(order, ya)
    for k in range(64):
        src = images[ya[k]].float() / 255
        dy, dx = shifts[k].tolist()
        got = xa[k].flip(2) if flips[k] else xa[k]
        h0, h1, w0, w1 = max(0, -dy), min(8, 8 - dy), max(0, -dx), min(8, 8 - dx)
        assert torch.allclose(got[:, h0:h1, w0:w1], src[:, h0 + dy:h1 + dy, w0 + dx:w1 + dx])
    assert 0 < int(flips.sum()) < 64 and int(shifts.abs().max()) == 2


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_equal(world_size):
    shards = [_epoch(_loader(100, shuffle=True, seed=7, rank=r, world_size=world_size))[1] for r in range(world_size)]
    per = 100 // world_size
    assert all(len(s) == per for s in shards)
    assert len(_loader(100, shuffle=True, rank=0, world_size=world_size)) == math.ceil(per / 16)
    allv = torch.cat(shards).tolist()
    assert len(set(allv)) == per * world_size
    # the union is the first per*world_size entries of the common permutation
    full = _loader(100, shuffle=True, seed=7).plan()[0]
    assert allv == full[:per * world_size].tolist()


def test_take_and_errors():
    ld = _loader(100).take(20)
    assert ld.num_samples == 20 and _epoch(ld)[1].tolist() == list(range(20))
    with pytest.raises(ValueError, match="dataset empty-set is empty"):
        TensorLoader(torch.zeros(0, 1, 2, 2, dtype=torch.uint8), torch.zeros(0), batch_size=4, normalize=NORM,
                     name="empty-set")
    with pytest.raises(ValueError, match="rank=2"):
        _loader(rank=2, world_size=2)
    with pytest.raises(ValueError, match="take"):
        _loader().take(0)


def test_cpu_batches_leave_the_callers_thread_setting_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = [torch.get_num_threads() for _ in _loader(64, shuffle=True, pad=1, flip=True)]
        assert seen == [2] * 4 and torch.get_num_threads() == 2
        x1 = _epoch(_loader(64, shuffle=True, pad=1, flip=True))[0]
        x2 = _epoch(_loader(64, shuffle=True, pad=1, flip=True, cpu_threads=None))[0]
        assert torch.equal(x1, x2)
    finally:
        torch.set_num_threads(before)

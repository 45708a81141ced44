"""Batched crop/flip against hand-made images, and the normalisation constants."""

from __future__ import annotations

import torch

from qcnn.data import Normalize, crop_flip, hflip, translate


def test_translate_is_a_shift_with_zero_fill():
    x = (torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)).repeat(3, 2, 1, 1)
    shifts = torch.tensor([[1, 0], [0, -2], [-1, 1]])
    out = translate(x, shifts, pad=2)
    a = x[0, 0]
    # dy=1: out[i, j] = x[i + 1, j]; last row falls outside -> 0
    assert torch.equal(out[0, 0], torch.cat([a[1:], torch.zeros(1, 4, dtype=torch.uint8)]))
    # dx=-2: out[i, j] = x[i, j - 2]; first two columns are zero
    assert torch.equal(out[1, 1], torch.cat([torch.zeros(4, 2, dtype=torch.uint8), a[:, :2]], dim=1))
    # dy=-1, dx=1
    expect = torch.zeros(4, 4, dtype=torch.uint8)
    expect[1:, :3] = a[:3, 1:]
    assert torch.equal(out[2, 0], expect)
    assert torch.equal(out[:, 0], out[:, 1])  # channels move together


def test_translate_matches_padded_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=g)
    shifts = torch.randint(-4, 5, (32, 2), generator=g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(32):
        top, left = 4 + shifts[i, 0], 4 + shifts[i, 1]
        assert torch.equal(translate(x, shifts, 4)[i], padded[i, :, top:top + 8, left:left + 8])


def test_flip_and_fused_crop_flip():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3)
    out = hflip(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    assert torch.equal(out[1], x[1])
    shifts, flips = torch.tensor([[0, 1], [1, -1]]), torch.tensor([True, True])
    assert torch.equal(crop_flip(x, shifts, flips, 1), translate(x, shifts, 1).flip(3))


def test_normalize_numbers():
    norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = norm(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 0, 0], -mean / std, atol=1e-6)
    assert torch.allclose(out[0, :, 0, 1], (1 - mean) / std, atol=1e-6)
    assert torch.allclose(out[0, :, 0, 2], (128 / 255 - mean) / std, atol=1e-6)
    assert torch.allclose(norm.inverse(out), x.float(), atol=1e-4)
    assert out.dtype == torch.float32


def test_calibration_views_mirror_crop_and_keep_the_random_state():
    """The images, their mirror images, then ``copies`` batches of resized crops: the same for the same seed,
    different for another, each crop a resampled window of its own image (a constant image stays constant),
    and the global random state untouched."""
    import pytest

    from qcnn.data.augment import calibration_views

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    x[2] = 0.7
    torch.manual_seed(123)
    expect_next = torch.rand(())
    torch.manual_seed(123)
    views = calibration_views(x, 2)
    assert torch.equal(torch.rand(()), expect_next)
    assert len(views) == 4 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[1], x.flip(-1))
    assert all(torch.equal(a, b) for a, b in zip(views, calibration_views(x, 2)))
    assert not torch.equal(views[2], calibration_views(x, 2, seed=1)[2])
    assert not torch.allclose(views[2][:2], x[:2], atol=1e-3) and not torch.allclose(views[2], views[3], atol=1e-3)
    assert torch.allclose(views[2][2], x[2], atol=1e-5) and torch.allclose(views[3][2], x[2], atol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(3, 16\)"):
        calibration_views(torch.zeros(3, 16), 1)
    with pytest.raises(ValueError, match="copies=-1"):
        calibration_views(x, -1)

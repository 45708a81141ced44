"""qcnn.calibrate: one call for any calibration data (DataLoader, tensors, dicts, a forward loop)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import qcnn
from qcnn.models import build_model


def _q(seed=0):
    torch.manual_seed(seed)
    return qcnn.quantize(build_model("lenet5", in_channels=1).eval(), qcnn.Recipe(method="uniform", w_bits=8, a_bits=8))


def _scales(q):
    return [m.scale.clone() for m in q.modules() if hasattr(m, "scale") and hasattr(m, "observer")]


def test_every_data_form_gives_the_same_ranges():
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(64, dtype=torch.long)
    ref = qcnn.calibrate(_q(), DataLoader(TensorDataset(x, y), batch_size=16))
    forms = [list(x.split(16)), [{"image": b, "label": 0} for b in x.split(16)],
             lambda m: [m(b) for b in x.split(32)]]
    for data in forms:
        q = qcnn.calibrate(_q(), data)
        assert all(torch.equal(a, b) for a, b in zip(_scales(ref), _scales(q)))
    assert len(_scales(ref)) >= 4 and torch.equal(ref(x), q(x))
    few = qcnn.calibrate(_q(), list(x.split(16)), max_images=16)  # only the first batch
    assert not all(torch.equal(a, b) for a, b in zip(_scales(ref), _scales(few)))


def test_bad_calibration_data_is_named():
    with pytest.raises(ValueError, match="calibration set is empty"):
        qcnn.calibrate(_q(), [])
    with pytest.raises(ValueError, match=r"dict without an 'image'.*\['pixels'\]"):
        qcnn.calibrate(_q(), [{"pixels": torch.randn(2, 1, 28, 28)}])
    with pytest.raises(TypeError, match="holds a str"):
        qcnn.calibrate(_q(), [("a", 1)])


def test_calibration_for_training_takes_every_data_form():
    """QAT calibration (ranges with train-mode BN, then BN statistics re-estimated) accepts what calibrate
    does: tensors and forward loops too, with the same ranges and BatchNorm statistics."""
    from qcnn.methods import calibrate_for_training

    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.zeros(64, dtype=torch.long)
    ref = calibrate_for_training(_q(), DataLoader(TensorDataset(x, y), batch_size=16), 64)
    stats = [b.clone() for n, b in ref.named_buffers() if n.endswith(("running_mean", "running_var"))]
    assert stats
    for data in (list(x.split(16)), lambda m: [m(b) for b in x.split(16)]):
        q = calibrate_for_training(_q(), data, 64)
        assert all(torch.equal(a, b) for a, b in zip(_scales(ref), _scales(q)))
        got = [b for n, b in q.named_buffers() if n.endswith(("running_mean", "running_var"))]
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(stats, got))

"""Fixtures of the data tests: the CIFAR-10 JPEG zip, decoded at most once per machine.

The decoded tensors go to the regular cache (``$QCNN_CACHE`` or ``~/.cache/qcnn``), the same one every other
user of ``get_data("cifar10", data_dir=<zip>)`` reads, so the 60k JPEGs are decoded once per machine, not
once per test run. The cold (decode) path is also tested on a small synthetic zip in ``test_datasets.py``.
"""

from __future__ import annotations

import time

import pytest

from qcnn.data import get_data


@pytest.fixture(scope="session")
def cifar_bundle(cifar_zip):
    t0 = time.perf_counter()
    bundle = get_data("cifar10", data_dir=cifar_zip, batch_size=256)
    bundle.first_load_seconds = time.perf_counter() - t0
    return bundle

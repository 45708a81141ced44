"""Shared test fixtures: paths to the real data and weights under ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QCNN_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR_ZIP = SHARED_DATA / "cifar10-jpeg.zip"
WEIGHTS = SHARED_DATA / "weights"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data {path} is missing (see README: make test installs it)")
    return path


@pytest.fixture(scope="session")
def cifar_zip() -> Path:
    return _need(CIFAR_ZIP)


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    return _need(WEIGHTS)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return _need(FASHION_DIR)

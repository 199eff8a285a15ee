"""Fixtures for batch scoring: MNIST test digits as uint8 arrays (writers for the formats: scoring_helpers.py)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest


@pytest.fixture(scope="session")
def digits(mnist_root) -> np.ndarray:
    """The first 300 MNIST test images, uint8 [300, 28, 28] (read here, not with the code under test)."""
    gz = mnist_root / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(gz.read_bytes()) if gz.exists() else (mnist_root / "t10k-images-idx3-ubyte").read_bytes()
    return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:300].copy()

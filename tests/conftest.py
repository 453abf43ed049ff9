"""Shared fixtures: a slice of real MNIST (fetched once into the user cache if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from experiments import data

if not torch.cuda.is_available():
    # Triton's interpreter runs the fused kernels (qcnn.accel.fused) on CPU tensors in
    # tests/test_fused.py. Triton reads this when the kernels are defined, at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def mnist_raw_dir() -> Path:
    """The cache folder holding the four verified IDX files (raw or .gz)."""
    data.load_uint8()
    folder = data.cache_dir()
    if data.locate(folder) is None:
        data.fetch(folder)
    return folder


@pytest.fixture(scope="session")
def mnist_small(mnist_raw_dir) -> data.Mnist:
    """2,000 training and 1,000 test images."""
    return data.load_mnist(train_limit=2000, test_limit=1000)

"""Shared fixtures: tiny synthetic image sets written in the formats the sources read."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from desensitize.config import parse_params

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format (gzip when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A miniature Fashion-MNIST directory: 60 + 20 distinct random 28x28 images, 10 classes."""
    rng = np.random.default_rng(1)
    directory = tmp_path / "fashion"
    directory.mkdir()
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return directory


def make_params(**data: object):
    """Params with the given `data` section fields (and fast reference training)."""
    return parse_params({"data": data, "reference": {"epochs": 1, "batch_size": 32}})

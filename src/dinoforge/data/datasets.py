"""Datasets: the bundled Fashion-MNIST subset (more pieces follow)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def read_idx(path: str | Path) -> np.ndarray:
    """Read an (optionally gzipped) IDX file, the format of the MNIST family."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

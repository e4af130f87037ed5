"""Shared pytest set-up: quiet progress bars, deterministic seeds, one torch thread per xdist worker."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DINOFORGE_NO_PROGRESS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny ops and small models only add OpenMP contention on a shared 2-core CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

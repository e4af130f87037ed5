"""Shared pytest set-up: quiet progress bars, deterministic seeds, one torch thread per xdist worker."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("DINOFORGE_NO_PROGRESS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

"""Shared pytest set-up: quiet progress bars, deterministic seeds, one torch thread per xdist worker."""

import os
import random
import tempfile
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("DINOFORGE_NO_PROGRESS", "1")
# hub names look for released weights in torch.hub's and Hugging Face's caches: tests (and their CLI subprocesses)
# see empty ones, never this machine's; a test that wants weights there builds its own (tests/test_hub_weights.py)
_NO_CACHES = os.path.join(tempfile.gettempdir(), "dinoforge-tests-no-weight-caches")
for _var in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE"):
    os.environ[_var] = os.path.join(_NO_CACHES, _var.lower())
os.environ.pop("HUGGINGFACE_HUB_CACHE", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="where the tests marked gpu run (benchmarks/gpu_check.py: cuda)")


def pytest_configure(config):
    """On CUDA, deterministic kernels (cuBLAS workspace set before CUDA starts): bit-exact tests stay bit-exact."""
    if config.getoption("--device").startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@pytest.fixture
def device(request) -> torch.device:
    """The --device of the tests marked gpu; fp32 there means fp32 (no TF32 matmuls or convolutions)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device(request.config.getoption("--device"))


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


KILL_SEED_ENV = "DINOFORGE_KILL_SEED"


class KillPoints(random.Random):
    """Where fault-injection tests kill a run: drawn from a fresh seed, or from DINOFORGE_KILL_SEED to replay one;
    str() is the line to replay it (printed, so a failure's captured output shows it, and put in failure messages)."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.seed_value = seed

    def __str__(self) -> str:
        return f"replay with {KILL_SEED_ENV}={self.seed_value}"


@pytest.fixture
def kill_points() -> KillPoints:
    points = KillPoints(int(os.environ.get(KILL_SEED_ENV) or time.time_ns() % 2**32))
    print(points)
    return points

"""benchmarks/learning.py --quick: the equal-wall-time learning harness writes its JSON and figure.

This checks the harness (budgets fitted, k-NN points at fractions of each run, the ratio, the figure), not any claim
about which recipe learns faster: the quick budgets are seconds long."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute on 2 cores
def test_learning_quick_writes_points_ratio_and_figure(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DINOFORGE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick", "--threads", "1",
         "--runners", "dinoforge,simclr,supervised", "--variant", "nolocal=crops.local_crops_number=0",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("learning-*.json")
    result = json.loads(path.read_text())
    assert result["quick"] and 0.7 < result["raw_pixels"] < 0.9  # raw 28 px pixels, cosine 20-NN
    runs = result["budgets"]["0.25min"]
    expected = {"dinoforge", "dinoforge:nolocal", "supervised"}
    has_lightly = importlib.util.find_spec("lightly") is not None
    assert set(runs) == expected | ({"simclr"} if has_lightly else set())
    for name, run in runs.items():
        points = run["points"]
        assert len(points) >= 2, name  # k-NN at each half of the run
        assert [p["step"] for p in points] == sorted(p["step"] for p in points) and points[-1]["step"] == run["steps"]
        assert all(0.0 < p["knn"] <= 1.0 and p["train_s"] > 0 for p in points), name
        assert run["steps"] <= 15 / run["probe_step_s"] + 1, name  # steps fitted to the 15 s budget at probed speed
    assert result["variants"] == {"dinoforge:nolocal": ["crops.local_crops_number=0"]}
    if has_lightly:
        ratio = result["ratio_dinoforge_to_best_peer"]["0.25min"]
        assert ratio["best_peer"] == "simclr"
        assert ratio["ratio"] == pytest.approx(
            runs["dinoforge"]["points"][-1]["knn"] / ratio["best_peer_knn"], abs=1e-3
        )
    else:
        assert "simclr: skipped (lightly is not installed" in proc.stdout
    assert Path(result["figure"]).stat().st_size > 10_000

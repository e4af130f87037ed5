"""benchmarks/gpu_check.py --smoke: every section of the GPU check runs on CPU and writes finite results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _numbers(obj: object, where: str = ""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, int | float):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")


@pytest.mark.slow  # about 2 minutes on 2 cores: a dozen processes, each importing torch, and the gpu tests
def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DINOFORGE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke"
    sections = report["sections"]
    assert list(sections) == ["tests", "train_step", "variants", "real_run", "data_path"]
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section)
        assert section["results"] and not any("error" in r for r in section["results"]), name
    bad = [(w, v) for w, v in _numbers(sections) if not math.isfinite(v)]
    assert not bad
    tests = sections["tests"]["results"]
    assert {r["outcome"] for r in tests} == {"passed"}
    parity = [r for r in tests if "match_official" in r["test"] or "matches_transformers" in r["test"]]
    assert len(parity) == 6  # the official code and transformers (registers), three sizes each
    assert all(r["fp32_max_abs_err"] <= 1e-5 and 0 < r["bf16_rel_err"] < 0.05 for r in parity)  # autocast ran
    resumed = [r for r in tests if "resume_is_exact" in r["test"]]
    assert len(resumed) == 5 and sum("benchmark_step_equals_loop_step" in r["test"] for r in tests) == 2
    step = sections["train_step"]["results"][0]["measurements"]["dinoforge"]
    assert step["img_per_s"] > 0 and step["flops_per_step"] > 0
    variants = {r["variant"] for r in sections["variants"]["results"]}
    expected = {"default", "packed", "fsdp2_one_process", "foreach_adamw", "activation_checkpointing", "compile_eager"}
    assert expected <= variants
    (run,) = sections["real_run"]["results"]
    assert run["steps"] == 4 and run["images_per_s"] > 0 and math.isfinite(run["final_total_loss"])
    paths = {r["path"]: r for r in sections["data_path"]["results"]}
    assert paths.keys() == {"pil_decode_in_workers", "decode_jpeg_on_device"}
    assert all(r["images_per_s"] > 0 for r in paths.values())
    vs = sections["data_path"]["vs_train_step"]
    assert vs["model"] == "demo" and vs["ratio"] == pytest.approx(vs["data_path_images_per_s"] / step["img_per_s"])
    assert "resume_is_exact" in proc.stdout and "data_path" in proc.stdout  # the printed table

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


@pytest.mark.slow  # about 65 s on 2 cores: a dozen processes, each importing torch
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
    assert list(sections) == ["parity", "train_step", "variants", "real_run", "data_path"]
    for name, section in sections.items():
        assert section["status"] == "ok", (name, section)
        assert section["results"] and not any("error" in r for r in section["results"]), name
    bad = [(w, v) for w, v in _numbers(sections) if not math.isfinite(v)]
    assert not bad
    parity = sections["parity"]["results"]
    assert {r["registers"] for r in parity} == {0, 4}
    assert all(r["fp32_max_abs_err"] <= 1e-5 for r in parity), parity  # README's fp32 parity, not the script's flag
    assert all(0 < r["bf16_rel_err"] < 0.05 for r in parity)  # autocast ran, and stayed close
    step = sections["train_step"]["results"][0]["measurements"]["dinoforge"]
    assert step["img_per_s"] > 0 and step["flops_per_step"] > 0
    variants = {r["variant"] for r in sections["variants"]["results"]}
    assert {"default", "fsdp2_one_process", "foreach_adamw", "activation_checkpointing", "compile_eager"} <= variants
    run = {r["part"]: r for r in sections["real_run"]["results"]}
    assert run["train"]["losses_finite"] and run["resume"]["bit_exact"] and run["resume"]["losses_equal"]
    paths = {r["path"]: r for r in sections["data_path"]["results"]}
    assert paths.keys() == {"pil_decode_in_workers", "decode_jpeg_on_device"}
    assert all(r["images_per_s"] > 0 for r in paths.values())
    vs = sections["data_path"]["vs_train_step"]
    assert vs["model"] == "demo" and vs["ratio"] == pytest.approx(vs["data_path_images_per_s"] / step["img_per_s"])
    assert "parity" in proc.stdout and "data_path" in proc.stdout  # the printed table

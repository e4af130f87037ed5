"""`dinoforge train | distill | embed | eval` through `python -m dinoforge`: what the README says a run folder holds,
train.keep_checkpoints, the one-line report of skipped unreadable images, and a real SIGKILL (mid-run and mid-
checkpoint-write) followed by --resume, bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli_errors import CLI_ENV, run_cli
from test_train import TINY, assert_same_run, read_metrics, tiny_cfg

from dinoforge.models.weights import load_backbone
from dinoforge.train.checkpoint import list_checkpoints, load_checkpoint

SKIPPED_LINE = "skipped 1 unreadable images (first: {})"


def write_bundled_images(folder: Path, n: int, classes: int = 0) -> list[Path]:
    """The first n bundled val images as PNG files in `folder` (spread over `classes` sub-folders when > 0)."""
    from dinoforge.data.datasets import BundledDataset

    val = BundledDataset("val")
    paths = [folder / (f"c{i % classes}" if classes else "") / f"{i:03d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        val.pil(i).save(path)
    return paths


@pytest.fixture
def folder_with_corrupt_image(tmp_path) -> tuple[Path, Path]:
    """16 images in two class folders plus one corrupt .jpg: (root, the corrupt file)."""
    root = tmp_path / "images"
    write_bundled_images(root, 16, classes=2)
    broken = root / "c0" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return root, broken


def _stderr_lines(r: subprocess.CompletedProcess, start: str) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith(start)]


def _run_tiny(args: list[str], data: tuple[Path, Path], *overrides: str) -> subprocess.CompletedProcess:
    """`dinoforge ARGS -c demo --data FOLDER` with the tiny config and `overrides`: exit 0, and one stderr line
    reporting the folder's corrupt image."""
    folder, broken = data
    r = run_cli(*args, "-c", "demo", "--data", str(folder), *TINY, *overrides, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _stderr_lines(r, "skipped ") == [SKIPPED_LINE.format(broken)]
    return r


def test_train_and_distill_commands_write_what_the_readme_lists(tmp_path, folder_with_corrupt_image):
    """8 steps of the tiny config on 16 images + 1 corrupt file (met in several epochs, reported once), a
    checkpoint every step with train.keep_checkpoints=2, a teacher export at step 4; then distillation of that run
    into a narrower student."""
    broken = folder_with_corrupt_image[1]
    out = tmp_path / "run"
    r = _run_tiny(
        ["train", "-o", str(out)],
        folder_with_corrupt_image,
        "train.checkpoint_period_iterations=1",
        "train.keep_checkpoints=2",
        "evaluation.eval_period_iterations=4",
    )
    assert f"results in {out}" in r.stdout and f"teacher backbone: {out / 'teacher_backbone.safetensors'}" in r.stdout

    assert (out / "config.yaml").read_text().count("keep_checkpoints: 2") == 1
    rows = read_metrics(out)
    assert [int(row["iteration"]) for row in rows] == list(range(8))
    for key in ("total_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "lr", "wd", "momentum"):
        assert all(row[key] != "" and abs(float(row[key])) < 1e3 for row in rows), key
    for key in ("teacher_temp", "images_per_s", "teacher_entropy", "teacher_cls_std", "stalled"):
        assert key in rows[0], key
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "curves.png").stat().st_size > 10_000
    # keep_checkpoints=2 of the 8 written (one per step): the last two, complete, and no temp file left
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["model_0000006.pth", "model_0000007.pth"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["model_0000006.pth", "model_0000007.pth"]
    assert load_checkpoint(out / "checkpoints" / "model_0000007.pth")["iteration"] == 7
    assert [p.parent.name for p in (out / "eval").glob("*/teacher_backbone.safetensors")] == ["training_3"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary.keys() >= {"iterations", "last", "skipped_images", "first_skipped_image", "warnings", "teacher"}
    assert summary["iterations"] == 8 and summary["skipped_images"] == 1
    assert summary["first_skipped_image"] == str(broken)
    assert summary["last"]["total_loss"] == pytest.approx(float(rows[-1]["total_loss"]))
    teacher = load_backbone(summary["teacher"])
    assert teacher.embed_dim == 32 and teacher(torch.zeros(1, 3, 16, 16)).shape == (1, 32)

    student = tmp_path / "distilled"
    teacher_ckpt = str(out / "checkpoints" / "model_0000007.pth")
    r = _run_tiny(
        ["distill", "--teacher", teacher_ckpt, "-o", str(student)],
        folder_with_corrupt_image,
        "optim.epochs=1",
        "student.embed_dim=16",
        "student.num_heads=1",
    )
    assert f"distilled student (EMA): {student / 'teacher_backbone.safetensors'}" in r.stdout
    assert [int(row["iteration"]) for row in read_metrics(student)] == list(range(4))
    assert json.loads((student / "train_summary.json").read_text())["iterations"] == 4
    assert [p.name for p in list_checkpoints(student / "checkpoints")] == ["model_0000001.pth", "model_0000003.pth"]
    assert load_backbone(str(student / "teacher_backbone.safetensors")).embed_dim == 16


def test_embed_and_eval_report_skipped_images(tmp_path, folder_with_corrupt_image):
    """The tiny backbone embeds and k-NN-evaluates the folder with a corrupt file: one `skipped` line each."""

    from dinoforge.models.weights import build_backbone, save_backbone
    from dinoforge.train.meta_arch import backbone_kwargs

    data, broken = folder_with_corrupt_image
    weights = save_backbone(build_backbone(backbone_kwargs(tiny_cfg())), tmp_path / "w.safetensors")
    common = ["--weights", str(weights), "--image-size", "16"]
    r = run_cli("embed", "--data", str(data), "--out", str(tmp_path / "emb"), "--weights", str(weights), "--size", "16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _stderr_lines(r, "skipped ") == [SKIPPED_LINE.format(broken)]
    knn = ["--train-data", str(data), "--val-data", str(data), "--out", str(tmp_path / "knn"), "--k", "3"]
    r = run_cli("eval", "knn", *common, *knn, "--no-cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _stderr_lines(r, "skipped ") == [SKIPPED_LINE.format(broken)]  # in both splits: one image


# ---------------------------------------------------------------- a real kill, then --resume

KILL_RUN = [  # 24 steps, a checkpoint every 3 (iterations 2, 5, ..., 23)
    *TINY,
    "optim.epochs=6",
    "train.checkpoint_period_iterations=3",
    "evaluation.eval_period_iterations=0",
]
KILL_HIGHRES = [  # the last 12 of those steps at 24/12 px crops instead of 16/8
    "crops.highres.iterations=12",
    "crops.highres.global_crops_size=24",
    "crops.highres.local_crops_size=12",
]

# Run in the child before the CLI: the checkpoint of iteration KILL_IN_WRITE is written half, then the process
# waits, its temp file open, for the SIGKILL (a marker file says when).
HALF_WRITE = """
import io, sys, time, torch
from pathlib import Path
real_save, marker, at = torch.save, Path(sys.argv[1]), int(sys.argv[2])
def half_save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("iteration") == at:
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: buf.tell() // 2])
        f.flush()
        marker.touch()
        time.sleep(600)
    return real_save(obj, f, *a, **k)
torch.save = half_save
sys.argv = ["dinoforge", *sys.argv[3:]]
from dinoforge.cli import main
main()
"""


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    """SIGKILL `proc` as soon as ready() holds (polled every 20 ms); fails if it exits first."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _logged_iterations(out: Path) -> int:
    try:
        return len(read_metrics(out))
    except (FileNotFoundError, KeyError):
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], KILL_HIGHRES], ids=["one_size", "highres"])
def test_sigkill_mid_checkpoint_and_mid_run_then_resume_is_bit_identical(tmp_path, extra, kill_points):
    """One uninterrupted run; another killed (SIGKILL) while writing its checkpoint of iteration 5, resumed and killed
    again at a random iteration, then given an unreadable newest checkpoint and resumed to the end: same metrics.csv
    and teacher, bit for bit; no checkpoint is ever left half-written. With crops.highres the random kill lands
    before or after the switch to larger crops at iteration 12."""
    train = ["train", "-c", "demo", "--data", "bundled:train"]
    ref, part = tmp_path / "ref", tmp_path / "part"
    r = run_cli(*train, "-o", str(ref), *KILL_RUN, *extra, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = part / "checkpoints"

    # 1. killed in the middle of writing the checkpoint of iteration 5
    marker = tmp_path / "writing"
    args = [*train, "-o", str(part), *KILL_RUN, *extra]
    cmd = [sys.executable, "-c", HALF_WRITE, str(marker), "5", *args]
    proc = subprocess.Popen(cmd, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, marker.exists, "the checkpoint write of iteration 5")
    assert [p.name for p in list_checkpoints(ckpts)] == ["model_0000002.pth"]  # never a half model_0000005.pth
    assert any(ckpts.glob(".model_0000005.pth.*.tmp"))  # the half-written temp file the kill left behind
    assert load_checkpoint(ckpts / "model_0000002.pth")["iteration"] == 2

    # 2. resumed (from iteration 3), killed once a random iteration past the next checkpoint is logged
    kill_at = kill_points.randint(6, 20)
    why = f"kill at iteration {kill_at}, {kill_points}"
    resume = [sys.executable, "-m", "dinoforge", *args, "--resume"]
    proc = subprocess.Popen(resume, env=CLI_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: _logged_iterations(part) > kill_at, why)
    newest = list_checkpoints(ckpts)[-1]
    assert 5 <= load_checkpoint(newest)["iteration"] < _logged_iterations(part), (why, newest)

    # 3. a newer checkpoint that does not read (cut short by a copy, a full disk): skipped, with a warning
    bad = ckpts / "model_0000099.pth"
    bad.write_bytes(newest.read_bytes()[:1000])
    expected_start = load_checkpoint(newest)["iteration"] + 1
    r = run_cli(*args, "--resume", timeout=300)
    assert r.returncode == 0, (why, r.stderr[-3000:])
    warnings = _stderr_lines(r, "warning: skipping a newer checkpoint")
    assert len(warnings) == 1 and str(bad) in warnings[0], (why, r.stderr)
    assert f"resuming from {newest} at iteration {expected_start}" in r.stderr, (why, r.stderr)
    assert_same_run(ref, part)

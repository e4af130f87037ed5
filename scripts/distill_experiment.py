"""Distillation pays (DINOv2 §5), on the bundled data: a bigger teacher pretrained with SSL, distilled into the demo
student, against the same student trained from scratch with SSL for the same steps (same data, same seed).

Stages (each a dinoforge command; a stage whose output exists is reused, so an interrupted run continues):
  teacher    dinoforge train -c demo --data bundled student.depth=8 optim.epochs=3   (234 steps)
  distilled  dinoforge distill -t <teacher's last checkpoint> -c demo --data bundled optim.epochs=1  (78 steps)
  scratch    dinoforge train -c demo --data bundled optim.epochs=1                                   (78 steps)
then `dinoforge eval knn --k 20` (cosine 20-NN, T 0.07, CLS, bundled train → val, at its default 32 px canvas)
on each exported backbone.
Prints a Markdown table and writes results.json into --out.

Usage: python scripts/distill_experiment.py [--out runs/distill_exp] [--lock /tmp/heavy.lock]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

NO_PERIODIC_EVAL = "evaluation.eval_period_iterations=0"


@contextmanager
def held(lock: Path | None):
    """An exclusive flock on `lock` (when given) around one heavy stage, so shared machines run them one at a time."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_stage(folder: Path, done: Path, cmd: list[str], lock: Path | None) -> float:
    """Run `cmd` unless `done` exists; the wall time is kept in folder/wall_s.txt (also for a reused stage)."""
    wall_file = folder / "wall_s.txt"
    if done.exists():
        return float(wall_file.read_text()) if wall_file.exists() else float("nan")
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    with held(lock):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "DINOFORGE_NO_PROGRESS": "1"})
        wall = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    wall_file.write_text(f"{wall:.1f}\n")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/distill_exp"), help="folder of the three runs")
    ap.add_argument(
        "--teacher-set", nargs="*", default=["student.depth=8", "optim.epochs=3"], help="teacher config overrides"
    )
    ap.add_argument(
        "--student-set", nargs="*", default=["optim.epochs=1"], help="overrides of both student runs (same for both)"
    )
    ap.add_argument("--k", type=int, default=20, help="neighbours of the k-NN evaluation")
    ap.add_argument("--lock", type=Path, default=None, help="flock this file around each training/evaluation")
    args = ap.parse_args()
    dino = [sys.executable, "-m", "dinoforge"]
    common = ["-c", "demo", "--data", "bundled"]
    out = args.out
    teacher_dir = out / "teacher"
    walls = {
        "teacher": run_stage(
            teacher_dir,
            teacher_dir / "teacher_backbone.safetensors",
            [*dino, "train", *common, "-o", str(teacher_dir), *args.teacher_set, NO_PERIODIC_EVAL],
            args.lock,
        )
    }
    ckpt = sorted((teacher_dir / "checkpoints").glob("model_*.pth"))[-1]
    students = {
        "distilled": [*dino, "distill", "-t", str(ckpt), *common, "-o", str(out / "distilled")],
        "scratch": [*dino, "train", *common, "-o", str(out / "scratch")],
    }
    for name, cmd in students.items():
        folder = out / name
        walls[name] = run_stage(
            folder, folder / "teacher_backbone.safetensors", [*cmd, *args.student_set, NO_PERIODIC_EVAL], args.lock
        )

    rows = []
    for name in ("teacher", "distilled", "scratch"):
        folder = out / name
        knn_dir = folder / "knn"
        weights = folder / "teacher_backbone.safetensors"
        run_stage(
            knn_dir,
            knn_dir / "metrics.json",
            [*dino, "eval", "knn", "-w", str(weights), "-o", str(knn_dir), "--k", str(args.k)],
            args.lock,
        )
        metrics = json.loads((knn_dir / "metrics.json").read_text())
        summary = json.loads((folder / "train_summary.json").read_text())
        s = OmegaConf.load(folder / "config.yaml").student
        rows.append(
            {
                "model": name,
                "arch": f"embed {s.embed_dim}, depth {s.depth}",
                "steps": summary["iterations"],
                "wall_s": walls[name],
                "top1": metrics["full"][f"k={args.k}"]["top1"],
            }
        )
    teacher_top1 = rows[0]["top1"]
    head = ["model", "architecture", "steps", "train wall (s)", f"k-NN top-1 (cosine {args.k}-NN, CLS)", "of teacher"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in rows:
        r["of_teacher"] = r["top1"] / teacher_top1
        cells = [r["model"], r["arch"], r["steps"], f"{r['wall_s']:.0f}", f"{r['top1']:.2f}", f"{r['of_teacher']:.1%}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    (out / "results.json").write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1))


if __name__ == "__main__":
    main()

"""Does distillation (DINOv2 §5) transfer knowledge on the bundled data? A bigger teacher distilled into the demo
student, against the same student trained from scratch with SSL for the same steps (same data, same seed).

--teacher supervised (the default): a teacher that knows more than the student can learn alone, trained WITH LABELS.
  supervised  scripts/supervised_reference.py --depth 8 --steps 600 --save <out>/supervised/backbone.safetensors
  teacher     dinoforge train -c demo --data bundled student.depth=8 student.pretrained_weights=<that file>
              train.freeze_backbone_iters=<all> optim.epochs=1: DINO/iBOT heads (78 steps) on the frozen supervised
              backbone, whose EMA stays equal to it (checked bit for bit: "backbone_unchanged" in results.json)
--teacher ssl: the earlier attempts' teacher, self-supervised only
  teacher     dinoforge train -c demo --data bundled student.depth=8 optim.epochs=3   (234 steps)
then, for either teacher:
  distilled   dinoforge distill -t <teacher's last checkpoint> -c demo --data bundled optim.epochs=2 (156 steps)
              (--distill-temps: one per teacher temperature; the small recipe's 0.02 by default)
  scratch     dinoforge train -c demo --data bundled optim.epochs=2                     (the same 156 steps)
and k-NN as in the demo on every exported backbone (backbone_knn_top1: cosine 20-NN, T 0.07, bundled 10k train →
2k val at the 24 px crop size, on CLS and on CLS ⊕ mean patch).
A stage whose output exists is reused, so an interrupted run continues. Prints a Markdown table and writes
results.json into --out.

Usage: python scripts/distill_experiment.py [--teacher supervised|ssl] [--out runs/distill_sup] [--lock FILE]
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

from dinoforge.config.config import load_config
from dinoforge.data.datasets import BundledDataset

TEACHER_TEMP = load_config("demo").train.small_recipe.teacher_temp  # the small recipe's own
STUDENT_EPOCHS = "optim.epochs=2"  # both students: 156 steps of the demo preset (which ran 2 epochs until 2026-12-02)
NO_PERIODIC_EVAL = "evaluation.eval_period_iterations=0"
SCRIPTS = Path(__file__).resolve().parent
FEATURES = ("cls", "cls+avgpool")


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
    folder.mkdir(parents=True, exist_ok=True)
    with held(lock), open(folder / "stdout.txt", "w") as log:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=log, env={**os.environ, "DINOFORGE_NO_PROGRESS": "1"})
        wall = time.perf_counter() - t0
    wall_file.write_text(f"{wall:.1f}\n")
    return wall


def knn(weights: Path, lock: Path | None) -> dict[str, float]:
    """The demo's k-NN top-1 (%) of a backbone file, cached beside it as knn.json."""
    cached = weights.parent / "knn.json"
    if not cached.exists():
        from dinoforge.eval.knn import backbone_knn_top1
        from dinoforge.models.weights import load_backbone

        with held(lock):
            backbone = load_backbone(weights)
            cached.write_text(json.dumps(backbone_knn_top1(backbone, image_size=backbone.arch["img_size"])))
    return json.loads(cached.read_text())


def backbones_equal(a: Path, b: Path) -> bool:
    """The two weights files hold bit-identical tensors under the same names."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)


def student_name(teacher_temp: float) -> str:
    return "distilled" if teacher_temp == TEACHER_TEMP else f"distilled_t{teacher_temp:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=("supervised", "ssl"), default="supervised", help="how the teacher learns")
    ap.add_argument("--out", type=Path, default=None, help="folder of the runs (default runs/distill_<teacher>)")
    ap.add_argument("--teacher-depth", type=int, default=8, help="blocks of the teacher (the student has the demo's)")
    ap.add_argument("--supervised-steps", type=int, default=600, help="labelled steps of the supervised teacher")
    ap.add_argument("--head-epochs", type=int, default=1, help="epochs of DINO/iBOT heads on the supervised backbone")
    ap.add_argument("--ssl-epochs", type=int, default=3, help="epochs of the SSL teacher")
    ap.add_argument(
        "--student-set", nargs="*", default=[], help="overrides of both student runs (same for both; default: demo's)"
    )
    ap.add_argument("--distill-set", nargs="*", default=[], help="overrides of the distilled runs only")
    ap.add_argument(
        "--distill-temps",
        type=float,
        nargs="+",
        default=[TEACHER_TEMP],
        help=f"one distilled student per teacher temperature (default the small recipe's {TEACHER_TEMP})",
    )
    ap.add_argument("--lock", type=Path, default=None, help="flock this file around each training/evaluation")
    args = ap.parse_args()
    if min(args.supervised_steps, args.head_epochs, args.ssl_epochs, args.teacher_depth) < 1:
        ap.error("--teacher-depth, --supervised-steps, --head-epochs and --ssl-epochs must be positive")
    out = args.out or Path(f"runs/distill_{args.teacher}")
    dino = [sys.executable, "-m", "dinoforge"]
    common = ["-c", "demo", "--data", "bundled"]
    teacher_dir, walls, record = out / "teacher", {}, {"teacher_kind": args.teacher}
    teacher_set = [f"student.depth={args.teacher_depth}", NO_PERIODIC_EVAL]
    if args.teacher == "supervised":
        sup_dir = out / "supervised"
        sup_weights = sup_dir / "backbone.safetensors"
        walls["supervised"] = run_stage(
            sup_dir,
            sup_weights,
            [sys.executable, str(SCRIPTS / "supervised_reference.py"), "--steps", str(args.supervised_steps)]
            + ["--depth", str(args.teacher_depth), "--save", str(sup_weights)],
            args.lock,
        )
        head_steps = args.head_epochs * (len(BundledDataset("train")) // 128)  # the demo's epochs of batch 128
        teacher_set += [
            f"student.pretrained_weights={sup_weights}",
            f"train.freeze_backbone_iters={head_steps}",
            f"optim.epochs={args.head_epochs}",
        ]
    else:
        teacher_set += [f"optim.epochs={args.ssl_epochs}"]
    walls["teacher"] = run_stage(
        teacher_dir,
        teacher_dir / "teacher_backbone.safetensors",
        [*dino, "train", *common, "-o", str(teacher_dir), *teacher_set],
        args.lock,
    )
    if args.teacher == "supervised":
        record["backbone_unchanged"] = backbones_equal(sup_weights, teacher_dir / "teacher_backbone.safetensors")
        if not record["backbone_unchanged"]:
            sys.exit("error: training the heads changed the frozen supervised backbone")
    ckpt = sorted((teacher_dir / "checkpoints").glob("model_*.pth"))[-1]
    students = {
        student_name(t): [*dino, "distill", "-t", str(ckpt), *common, "-o", str(out / student_name(t))]
        + [*args.distill_set, f"train.small_recipe.teacher_temp={t}"]
        for t in args.distill_temps
    }
    students["scratch"] = [*dino, "train", *common, "-o", str(out / "scratch")]
    for name, cmd in students.items():
        folder = out / name
        walls[name] = run_stage(
            folder,
            folder / "teacher_backbone.safetensors",
            [*cmd, STUDENT_EPOCHS, *args.student_set, NO_PERIODIC_EVAL],
            args.lock,
        )

    rows = []
    for name in ("teacher", *students):
        folder = out / name
        summary = json.loads((folder / "train_summary.json").read_text())
        s = OmegaConf.load(folder / "config.yaml").student
        label = f"teacher ({args.teacher})" if name == "teacher" else name
        steps = summary["iterations"]
        if name == "teacher" and args.teacher == "supervised":
            steps = f"{args.supervised_steps} labelled + {steps} heads only"
        rows.append(
            {
                "model": label,
                "arch": f"embed {s.embed_dim}, depth {s.depth}",
                "steps": steps,
                "wall_s": walls[name] + walls.get("supervised", 0.0) * (name == "teacher"),
                "knn": knn(folder / "teacher_backbone.safetensors", args.lock),
            }
        )
    head = ["model", "architecture", "steps", "train wall (s)", "k-NN CLS", "k-NN CLS ⊕ patch", "of teacher (⊕ patch)"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for r in rows:
        r["of_teacher"] = {f: r["knn"][f] / rows[0]["knn"][f] for f in FEATURES}
        cells = [r["model"], r["arch"], r["steps"], f"{r['wall_s']:.0f}"]
        cells += [f"{r['knn'][f]:.2f}" for f in FEATURES] + [f"{r['of_teacher']['cls+avgpool']:.1%}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    record.update(rows=rows, argv=sys.argv[1:])
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps({r["model"]: r["knn"] for r in rows}))


if __name__ == "__main__":
    main()

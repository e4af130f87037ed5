"""High-resolution adaptation in miniature (the DINOv2 §4 ablation on the demo): the demo preset trained at 24 px
throughout, at 32 px throughout (16 px local crops), and at 24 px then 32 px for its last iterations
(crops.highres), all with the same step budget; each teacher evaluated by k-NN at 24 and 32 px.

Each run is `python -m dinoforge train -c demo ...` (printed before it starts), its wall time written to
<out>/<run>/wall_s.json; a run whose folder already holds train_summary.json and wall_s.json is not run again.
Run it alone on the machine (wall times are the cost being compared).
Usage: python scripts/highres_ablation.py [--out runs/highres] [--adapt-iterations 24] [extra key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dinoforge.demo import KNN_K
from dinoforge.eval.knn import backbone_knn_top1
from dinoforge.models.weights import load_backbone

SIZES = (24, 32)


def runs(adapt_iterations: int) -> dict[str, list[str]]:
    """Run name -> its overrides of the demo preset."""
    return {
        "24px": [],
        "32px": ["crops.global_crops_size=32", "crops.local_crops_size=16"],
        f"24px_then_32px_last{adapt_iterations}": [
            f"crops.highres.iterations={adapt_iterations}",
            "crops.highres.global_crops_size=32",
            "crops.highres.local_crops_size=16",
        ],
    }


def train(out: Path, overrides: list[str]) -> float:
    """Train the demo with `overrides` into `out` (unless done before); its wall time in seconds."""
    wall = out / "wall_s.json"
    if (out / "train_summary.json").exists() and wall.exists():
        return json.loads(wall.read_text())["wall_s"]
    # 2 epochs (156 steps), the demo preset's length when the ablation was measured
    cmd = [sys.executable, "-m", "dinoforge", "train", "-c", "demo", "-o", str(out), "optim.epochs=2", *overrides]
    print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    wall.write_text(json.dumps({"wall_s": seconds}))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/highres"), help="folder of the three runs")
    ap.add_argument("--adapt-iterations", type=int, default=24, help="high-res iterations at the end (24 of 156)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for all three runs")
    args = ap.parse_args()
    common = ["evaluation.eval_period_iterations=0", *args.overrides]
    rows = {}
    for name, overrides in runs(args.adapt_iterations).items():
        seconds = train(args.out / name, [*common, *overrides])
        backbone = load_backbone(str(args.out / name / "teacher_backbone.safetensors"))
        knn = {size: backbone_knn_top1(backbone, k=KNN_K, image_size=size) for size in SIZES}
        rows[name] = {"wall_s": round(seconds, 1), **{f"knn_{s}px": v for s, v in knn.items()}}
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    head = " | ".join(f"k-NN @ {s} px (CLS ⊕ mean patch / CLS)" for s in SIZES)
    print(f"| run | {head} | train wall time |")
    print("|---|" + "---|" * len(SIZES) + "---|")
    for name, r in rows.items():
        cells = " | ".join(f"{r[f'knn_{s}px']['cls+avgpool']:.2f} / {r[f'knn_{s}px']['cls']:.2f}" for s in SIZES)
        print(f"| {name} | {cells} | {r['wall_s']:.0f} s |")


if __name__ == "__main__":
    main()

"""What a training run reports: metrics.csv + TensorBoard, the progress bar, stall/collapse warnings, curves.png."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dinoforge.utils import atomic_write, eprint

# A DINO teacher whose prototype distribution keeps this fraction of log K (uniform targets: no signal for the CLS
# token), or whose normalised CLS spread falls below COLLAPSED_CLS_STD (every image the same), past
# STALL_FRACTION of the run, is reported.
UNIFORM_ENTROPY = 0.99
COLLAPSED_CLS_STD = 0.05
STALL_FRACTION = 0.3


class MetricsLog:
    """metrics.csv (one row per logged iteration) and TensorBoard scalars; on resume, rows ≥ start are dropped."""

    def __init__(self, out: Path, start_iter: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.rows: list[dict] = []
        self.tb = None
        if not enabled:
            return
        if self.path.exists() and start_iter > 0:
            with open(self.path) as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iteration"]) < start_iter]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_iter)
        except ImportError:
            self.tb = None

    def log(self, it: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.rows.append({"iteration": it, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, it)
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(text.getvalue().encode()))  # a kill never leaves half a file

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """Rich progress bar with loss parts, lr, images/s and ETA (main process only)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.bar.start()

    def update(self, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class StallMonitor:
    """Reports once each a DINO loss stuck at the uniform solution and a collapsed CLS token, naming the cause and the
    fix; `check` returns 1.0 while a problem stands (the `stalled` column of metrics.csv)."""

    def __init__(self, max_iter: int, recipe: str, warn: bool = True):
        self.first_check = math.ceil(STALL_FRACTION * max_iter)
        self.recipe, self.warn = recipe, warn
        self.warnings: dict[str, str] = {}

    def check(self, it: int, values: dict[str, float]) -> float:
        if it < self.first_check:
            return 0.0
        found = {}
        entropy, spread = values.get("teacher_entropy"), values.get("teacher_cls_std")
        if entropy is not None and entropy >= UNIFORM_ENTROPY:
            fix = (
                "train.recipe=small (EMA horizon, temperatures and warm-ups scaled to the run)"
                if self.recipe == "official"
                else "more iterations (optim.epochs) or a larger batch"
            )
            found["dino_uniform"] = (
                f"DINO stalled at iteration {it}: the teacher's prototype distribution is uniform "
                f"(entropy {entropy:.4f} of log K), so the CLS token gets no DINO signal; likely cause: a short "
                f"or small-data run with the official schedules (slow EMA teacher, LayerScale 1e-5); try {fix}"
            )
        if spread is not None and spread < COLLAPSED_CLS_STD:
            found["cls_collapse"] = (
                f"CLS collapse at iteration {it}: every image gives nearly the same teacher CLS "
                f"(spread {spread:.3g}); likely cause: too high a learning rate or teacher temperature; "
                "try a lower optim.base_lr or teacher.teacher_temp"
            )
        for key, message in found.items():
            if key not in self.warnings and self.warn:
                eprint(f"warning: {message}")
            self.warnings.setdefault(key, message)
        return float(bool(found))


def plot_curves(rows: list[dict], path: Path) -> Path | None:
    """curves.png from metrics.csv rows: loss parts, collapse indicators, schedules, periodic k-NN when present."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["iteration"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pts], [p[1] for p in pts]

    keys = set().union(*rows)
    panels = [
        ("losses", sorted(k for k in keys if k.endswith("_loss")), "log"),
        ("collapse indicators", ["teacher_entropy", "teacher_cls_std", "stalled"], "linear"),
        ("schedules (÷ first value)", ["lr", "wd", "momentum", "teacher_temp"], "linear"),
        ("k-NN top-1 (%)", sorted(k for k in keys if k.startswith("knn_top1")), "linear"),
    ]
    panels = [p for p in panels if any(k in keys for k in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, names, scale) in zip(axes[0], panels, strict=True):
        for name in names:
            x, y = series(name)
            if not y:
                continue
            if title.startswith("schedules") and y[0]:
                y = [v / y[0] for v in y]
            ax.plot(x, y, marker="o" if len(x) < 4 else None, label=name)
        if title == "collapse indicators":
            ax.axhline(UNIFORM_ENTROPY, color="grey", linestyle="--", linewidth=0.8)  # the stall threshold
        if scale == "log" and all(v > 0 for name in names for v in series(name)[1]):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

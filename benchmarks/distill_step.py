"""Time and peak memory of one distillation step against one SSL step of the same student (DINOv2 §5).

Student: the `demo` preset (embed 128, depth 4). SSL step: EMA teacher of the student's size, masked student.
Distillation step: a frozen teacher `--teacher-depth` blocks deep and `--teacher-width` wide (random weights, with
its heads, written as a training checkpoint), unmasked student, iBOT on every global-crop patch, EMA of the student.
Both are the harness's DinoforgeStep (`train.step.TrainStep`, the step `dinoforge train` runs) on the same batches,
each in its own spawned process (own peak RSS), steps alternated by the parent. Prints one JSON line per step kind and a
ratio line (distillation ÷ SSL).

    python benchmarks/distill_step.py                        # < 1 min on 2 CPU cores
    python benchmarks/distill_step.py --teacher-depth 12 --teacher-width 192 --steps 10
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from harness import BENCH_MODELS, Spec, emit, measure_pair, run_cli, save

from dinoforge.utils import DinoforgeError, resolve_device

STUDENT = "demo"


def write_teacher(path: Path, depth: int, width: int) -> Path:
    """A randomly initialised SSL model of the demo recipe, `depth` × `width`, saved as a training checkpoint."""
    from dinoforge.config.config import load_config
    from dinoforge.train.meta_arch import SSLMetaArch

    preset, _, overrides = BENCH_MODELS[STUDENT]
    heads = width // 32
    cfg = load_config(
        preset, [*overrides, f"student.depth={depth}", f"student.embed_dim={width}", f"student.num_heads={heads}"]
    )
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    torch.save({"model": model.state_dict(), "arch": model.arch}, path)
    return path


def main(
    teacher_depth: Annotated[int, typer.Option(help="teacher blocks (student: 4)")] = 8,
    teacher_width: Annotated[int, typer.Option(help="teacher embed dim (student: 128)")] = 192,
    batch: Annotated[int, typer.Option(help="images per step")] = 64,
    steps: Annotated[int, typer.Option(help="timed steps per kind")] = 8,
    warmup: Annotated[int, typer.Option(help="untimed warm-up steps per kind")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch.set_num_threads in each worker (default: torch's)")] = None,
    out: Annotated[Path, typer.Option(help="folder for results.json")] = Path("runs/bench/distill_step"),
) -> None:
    """Benchmark a distillation step against an SSL step of the same student; prints JSON lines and the ratio."""
    if steps < 1 or warmup < 0 or batch < 2:
        raise DinoforgeError("--steps must be >= 1, --warmup >= 0 and --batch >= 2")
    if teacher_width < 32 or teacher_width % 32:
        raise DinoforgeError("--teacher-width must be a positive multiple of 32 (heads of 32 dims)")
    dev = str(resolve_device(device))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_teacher(Path(tmp) / "teacher.pth", teacher_depth, teacher_width)
        distill = ["distillation.enabled=true", f"distillation.teacher_checkpoint={ckpt}"]
        specs = [
            Spec("dinoforge", STUDENT, batch, steps, warmup, dev, threads, "auto", False, extra)
            for extra in ([], distill)
        ]
        ssl, dist = measure_pair(specs)
    teacher = f"embed{teacher_width} depth{teacher_depth} heads{teacher_width // 32}"
    ssl.update(step="ssl", teacher=f"EMA of the student ({ssl['arch']})")
    dist.update(step="distillation", teacher=f"frozen {teacher}")
    for r in (ssl, dist):
        emit(r)
    ratio = {
        "ratio": "distillation/ssl step time",
        "model": STUDENT,
        "batch": batch,
        "device": dev,
        "value": ssl["img_per_s"] / dist["img_per_s"],
        "value_median": dist["step_ms_median"] / ssl["step_ms_median"],
        "cpu_time_ratio": dist["cpu_s_per_step"] / ssl["cpu_s_per_step"],
        "peak_rss_ratio": dist["peak_rss_mb"] / ssl["peak_rss_mb"],
        "step_mem_ratio": dist["step_mem_mb"] / ssl["step_mem_mb"],
    }
    if "peak_cuda_mb" in ssl:
        ratio["peak_cuda_ratio"] = dist["peak_cuda_mb"] / ssl["peak_cuda_mb"]
    emit(ratio)
    save(out, [ssl, dist], [ratio])


if __name__ == "__main__":
    run_cli(main)

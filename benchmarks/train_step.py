"""Images/s and peak memory of one DINOv2 training step: dinoforge vs the same recipe built from lightly 1.6.

One step = teacher forward, student forward + backward (DINO + iBOT + KoLeo), gradient clipping, AdamW step and
EMA teacher update, on identical pre-collated batches (same crops, same block masks) for both implementations.
Each implementation runs in its own spawned process (so its peak memory is its own) and the parent alternates
their steps (so both see the same machine load). Prints one JSON line per measurement, then one ratio line
(dinoforge img/s ÷ lightly img/s) per model.

    python benchmarks/train_step.py                          # demo + ViT-S/14 (reduced crops), CPU
    python benchmarks/train_step.py --models vitl14          # ViT-L/14 with its stochastic depth 0.3
    python benchmarks/train_step.py --device cuda --models vits14 --batch 64
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from harness import BENCH_MODELS, IMPLS, Spec, emit, measure_pair, require_lightly, run_cli, save

from dinoforge.utils import DinoforgeError, resolve_device, track


def main(
    models: Annotated[str, typer.Option(help=f"comma-separated presets: {', '.join(BENCH_MODELS)}")] = "demo,vits14",
    batch: Annotated[
        int | None, typer.Option(help="images per step (default: the preset's: demo 64, vits14 16, vitl14 8)")
    ] = None,
    steps: Annotated[int, typer.Option(help="timed steps per implementation")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up steps per implementation (same for both)")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch.set_num_threads in each worker (default: torch's)")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")] = "auto",
    impls: Annotated[
        str, typer.Option(help="comma-separated implementations to run: dinoforge, lightly")
    ] = "dinoforge,lightly",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="config override key=value applied to both sides (repeatable)")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for results.json")] = Path("runs/bench/train_step"),
) -> None:
    """Benchmark one DINOv2 training step of dinoforge against lightly 1.6 (same model, crops, batch, masks).

    Prints one JSON line per measurement and a ratio line per model (target in issue 4: ratio >= 1.5).
    """
    names = [m for m in models.split(",") if m]
    unknown = [m for m in names if m not in BENCH_MODELS]
    if unknown:
        raise DinoforgeError(f"unknown model preset(s) {', '.join(unknown)}; choose from {', '.join(BENCH_MODELS)}")
    chosen = [i for i in impls.split(",") if i]
    if not chosen or any(i not in IMPLS for i in chosen):
        raise DinoforgeError(f"--impls must list some of {', '.join(IMPLS)}, got {impls!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise DinoforgeError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if steps < 1 or warmup < 0:
        raise DinoforgeError("--steps must be >= 1 and --warmup >= 0")
    if "lightly" in chosen:
        require_lightly()
    dev = str(resolve_device(device))
    results, ratios = [], []
    for m in track(names, description="train-step benchmark"):
        specs = [
            Spec(
                i,
                m,
                batch or BENCH_MODELS[m][1],
                steps,
                warmup,
                dev,
                threads,
                precision,
                "lightly" in chosen,
                list(set_ or []),
            )
            for i in chosen
        ]
        got = {r["impl"]: r for r in measure_pair(specs)}
        for r in got.values():
            emit(r)
            results.append(r)
        if len(got) == 2:
            d, lt = got["dinoforge"], got["lightly"]
            line = {
                "ratio": "dinoforge/lightly img_per_s",
                "model": m,
                "batch": d["batch"],
                "device": d["device"],
                "value": d["img_per_s"] / lt["img_per_s"],
                "value_median": d["img_per_s_median"] / lt["img_per_s_median"],
                "cpu_time_ratio": lt["cpu_s_per_step"] / d["cpu_s_per_step"],
                "peak_rss_ratio": d["peak_rss_mb"] / lt["peak_rss_mb"],
                "target": 1.5,
            }
            if "peak_cuda_mb" in d:
                line["peak_cuda_ratio"] = d["peak_cuda_mb"] / lt["peak_cuda_mb"]
            emit(line)
            ratios.append(line)
    save(out, results, ratios)


if __name__ == "__main__":
    run_cli(main)

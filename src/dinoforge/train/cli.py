"""`dinoforge train | distill | demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinoforge.config.config import PRESETS

OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Config overrides as key=value (e.g. optim.epochs=10 train.batch_size_per_gpu=32)."),
]


def train_command(
    config: Annotated[
        str,
        typer.Option("--config", "-c", help=f"YAML file (official layout) or preset: {', '.join(PRESETS)}."),
    ] = "demo",
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Image folder, manifest (.txt/.csv/.jsonl) or bundled[:split]; default train.dataset_path.",
        ),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Run folder: config, metrics, checkpoints, exports.")
    ] = Path("runs/train"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output-dir.")
    ] = False,
    overrides: OverridesArg = None,
) -> None:
    """DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo, EMA teacher, multi-crop).

    Runs on one process, or under `torchrun --nproc-per-node N -m dinoforge train ...` (gloo on CPU, NCCL on GPU;
    train.distributed=ddp|fsdp). Start from existing backbone weights with student.pretrained_weights=PATH.
    """
    from dinoforge.config.config import load_config
    from dinoforge.train import distributed as dist_utils
    from dinoforge.train.loop import train

    cfg = load_config(config, overrides or [])
    summary = train(cfg, output_dir, data=data, resume=resume)
    if dist_utils.is_main_process():
        typer.echo(f"teacher backbone: {summary['teacher']}")
        typer.echo(f"results in {output_dir}")
    dist_utils.shutdown()


def distill_command(
    teacher: Annotated[
        Path,
        typer.Option("--teacher", "-t", help="Training checkpoint of the larger model (with its DINO/iBOT heads)."),
    ],
    config: Annotated[
        str, typer.Option("--config", "-c", help="Student config: YAML file or preset (e.g. vits14).")
    ] = "vits14",
    data: Annotated[str | None, typer.Option("--data", "-d", help="Image folder, manifest or bundled[:split].")] = None,
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Run folder.")] = Path("runs/distill"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output-dir.")
    ] = False,
    overrides: OverridesArg = None,
) -> None:
    """Distil a frozen larger teacher into the student of --config (DINOv2 §5): same losses and crops, no masking,
    iBOT on all patches, and a spare EMA of the student exported as the result (teacher_backbone.safetensors)."""
    from dinoforge.config.config import load_config
    from dinoforge.train import distributed as dist_utils
    from dinoforge.train.loop import train
    from dinoforge.utils import require_file

    require_file(teacher, "teacher checkpoint")
    cfg = load_config(config, [*(overrides or []), "distillation.enabled=true"])
    cfg.distillation.teacher_checkpoint = str(teacher)
    summary = train(cfg, output_dir, data=data, resume=resume)
    if dist_utils.is_main_process():
        typer.echo(f"distilled student (EMA): {summary['teacher']}")
        typer.echo(f"results in {output_dir}")
    dist_utils.shutdown()


def demo_command(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where the demo writes everything.")] = Path(
        "runs/demo"
    ),
    overrides: OverridesArg = None,
) -> None:
    """Pretrain a small ViT on the bundled Fashion-MNIST subset, evaluate k-NN (trained vs random init vs raw pixels),
    draw a PCA-of-patch-features figure, and write summary.json."""
    from dinoforge.demo import run_demo

    run_demo(output_dir, overrides or [])

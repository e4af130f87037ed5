"""`dinoforge train | distill`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dinoforge.config.config import PRESETS

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Config overrides as key=value (e.g. optim.epochs=10 train.batch_size_per_gpu=32)."),
]


def periodic_knn(cfg: DictConfig) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """The periodic k-NN callback `evaluation.knn_train_data`/`knn_val_data` ask for (None when unset)."""
    from dinoforge.eval.knn import knn_callback

    e = cfg.evaluation
    if not (e.knn_train_data and e.knn_val_data):
        return None
    return knn_callback(e.knn_train_data, e.knn_val_data, k=e.knn_k, image_size=cfg.crops.global_crops_size)


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
    train.distributed=ddp|fsdp). Start from existing backbone weights with student.pretrained_weights=PATH (released
    518 px weights are resized to the crop size; train.freeze_backbone_iters=N trains the fresh heads alone first).
    High-resolution adaptation (DINOv2 §4): crops.highres.iterations=N crops.highres.global_crops_size=G
    crops.highres.local_crops_size=L trains the last N iterations at G/L px crops (position embeddings resized once),
    or start a separate run from a checkpoint at a larger crop size (presets vitl14_highres, vitg14_highres).
    For a short run or a small data set use train.recipe=small (schedules, LayerScale, blur and prototypes derived
    from the run; the official presets keep train.recipe=official).
    """
    from dinoforge import distributed as dist_utils
    from dinoforge.config.config import load_config
    from dinoforge.data.datasets import report_skipped
    from dinoforge.train.loop import train

    cfg = load_config(config, overrides or [])
    summary = train(cfg, output_dir, data=data, resume=resume, evaluate=periodic_knn(cfg))
    if dist_utils.is_main_process():
        typer.echo(f"teacher backbone: {summary['teacher']}")
        typer.echo(f"results in {output_dir}")
        report_skipped(summary)
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
    from dinoforge import distributed as dist_utils
    from dinoforge.config.config import load_config
    from dinoforge.data.datasets import report_skipped
    from dinoforge.train.loop import train
    from dinoforge.utils import require_file

    require_file(teacher, "teacher checkpoint")
    cfg = load_config(config, [*(overrides or []), "distillation.enabled=true"])
    cfg.distillation.teacher_checkpoint = str(teacher)
    summary = train(cfg, output_dir, data=data, resume=resume, evaluate=periodic_knn(cfg))
    if dist_utils.is_main_process():
        typer.echo(f"distilled student (EMA): {summary['teacher']}")
        typer.echo(f"results in {output_dir}")
        report_skipped(summary)
    dist_utils.shutdown()

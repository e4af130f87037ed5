"""`dinoforge train | distill | finetune`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dinoforge.cli_common import BatchOpt, DeviceOpt, ModelOpt, OutOpt, RandomInitOpt, WeightsOpt
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
        str | None,
        typer.Option(
            "--config",
            "-c",
            help=f"YAML file (official layout) or preset: {', '.join(PRESETS)}. Default: chosen from the images of "
            "--data and this machine (printed, and saved in config.yaml as train.auto_choice).",
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            "-d",
            help="Image folder, manifest (.txt/.csv/.jsonl), shards (s/{000000..000009}.tar) or bundled[:split]; "
            "default train.dataset_path.",
        ),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Run folder: config, metrics, checkpoints, exports.")
    ] = Path("runs/train"),
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the newest checkpoint in --output-dir.")
    ] = False,
    time_budget: Annotated[
        str | None,
        typer.Option(
            "--time",
            help="Wall-clock budget (600s, 10m, 1.5h): a short probe times the step, and the run's length and "
            "every schedule are fitted to the steps that fill it.",
        ),
    ] = None,
    overrides: OverridesArg = None,
) -> None:
    """DINOv2 self-supervised pretraining (DINO + iBOT + KoLeo, EMA teacher, multi-crop).

    Without -c the model, crops, batch and recipe are chosen from the images of --data and this machine (printed,
    saved in config.yaml); --time fits the run to a wall-clock budget; key=value overrides win over both.

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
    from dinoforge.data.datasets import report_skipped

    summary = run_train(config, data, output_dir, resume, time_budget, overrides or [])
    if dist_utils.is_main_process():
        typer.echo(f"teacher backbone: {summary['teacher']}")
        typer.echo(f"results in {output_dir}")
        report_skipped(summary)
    dist_utils.shutdown()


def run_train(
    config: str | None,
    data: str | None,
    output_dir: Path,
    resume: bool = False,
    time_budget: str | None = None,
    overrides: list[str] | None = None,
) -> dict:
    """`dinoforge train` as a function (also `dinoforge.train`): the config (`-c`, or chosen from the data and the
    machine), fitted to `time_budget`, trained with the periodic k-NN it asks for; returns the run's summary."""
    from dinoforge import distributed as dist_utils
    from dinoforge.train.auto import configure, parse_duration
    from dinoforge.train.loop import train
    from dinoforge.utils import DinoforgeError, eprint

    budget = parse_duration(time_budget) if time_budget else None
    if resume and budget is not None:
        raise DinoforgeError("--time fits a new run; a resumed run keeps the length saved in its config.yaml")
    saved = Path(output_dir) / "config.yaml"
    if resume and config is None and saved.is_file():  # the run's own config: a resumed run is the run it continues
        config = str(saved)
    say = eprint if dist_utils.is_main_process() else lambda *_: None
    cfg = configure(config, data, list(overrides or []), budget, say)
    return train(cfg, Path(output_dir), data=data, resume=resume, evaluate=periodic_knn(cfg))


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
    """Distil a frozen larger teacher into the student of --config (DINOv2 §5): same losses and crops, no masking and
    no stochastic depth in the student, iBOT on all patches of the global crops, and a spare EMA of the student
    exported as the result (teacher_backbone.safetensors)."""
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


def finetune_command(
    out: OutOpt = Path("runs/finetune"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    train_data: Annotated[
        str,
        typer.Option("--train-data", help="Labelled train images: bundled:train, a class-folder tree or a file list."),
    ] = "bundled:train",
    val_data: Annotated[
        str, typer.Option("--val-data", help="Labelled val images, same forms; labels follow the train class names.")
    ] = "bundled:val",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the train images.")] = 10,
    batch_size: BatchOpt = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak AdamW learning rate (head and last block).")] = 5e-4,
    min_lr: Annotated[float, typer.Option("--min-lr", min=0.0, help="Learning rate at the end of the cosine.")] = 1e-6,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", min=0, help="Linear lr warm-up from 0.")] = 1,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay (none on biases, norms, LayerScale).")
    ] = 0.05,
    layer_decay: Annotated[
        float,
        typer.Option("--layer-decay", min=0.0, max=1.0, help="Layer-wise lr decay: block i gets lr × d^(depth − i)."),
    ] = 0.75,
    drop_path: Annotated[
        float, typer.Option("--drop-path", min=0.0, max=1.0, help="Stochastic depth (the backbone's drop_path_rate).")
    ] = 0.1,
    min_scale: Annotated[
        float,
        typer.Option("--min-scale", min=0.0, max=1.0, help="Smallest area of the random resized crop (0.08..1)."),
    ] = 0.08,
    features: Annotated[
        str, typer.Option("--features", help="Head input: cls, or cls+avgpool (CLS ⊕ mean patch token).")
    ] = "cls+avgpool",
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size",
            min=1,
            help="Side in px, as in `eval`: train crops and val centre crop (folders, default 224), canvas for the "
            "bundled set (default its native 32 px, rounded to the patch).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the head init, data order, crops and drop path.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Data-loading processes.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Fine-tune a whole backbone with a linear head on labelled images: AdamW, layer-wise lr decay, cosine lr with
    warm-up, drop path, random resized crop + flip; top-1 on the val images after every epoch.

    Writes metrics.json, checkpoints/ (every epoch; --resume continues exactly), backbone.safetensors (a weights
    file for every command: --weights, load_backbone) and head.safetensors into --out.
    """
    from dinoforge.data.datasets import report_skipped
    from dinoforge.models.hub import weights_source
    from dinoforge.models.weights import load_model
    from dinoforge.train.finetune import FEATURES, FinetuneSettings, finetune
    from dinoforge.utils import DinoforgeError

    if features not in FEATURES:
        raise DinoforgeError(f"--features must be {' or '.join(FEATURES)}, got {features!r}")
    if min_scale <= 0:
        raise DinoforgeError(f"--min-scale must be in (0, 1], got {min_scale}")
    if warmup_epochs > epochs:
        raise DinoforgeError(f"--warmup-epochs {warmup_epochs} is more than --epochs {epochs}")
    settings = FinetuneSettings(
        epochs=epochs, batch_size=batch_size, lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs,
        weight_decay=weight_decay, layer_decay=layer_decay, min_scale=min_scale, features=features,
        image_size=image_size, seed=seed,
    )  # fmt: skip
    net = load_model(model, weights, device, random_init, drop_path_rate=drop_path)
    record = {"model": model, "weights": weights_source(model, weights, random_init), "random_init": random_init}
    device_used = next(net.parameters()).device
    metrics = finetune(
        net, train_data, val_data, out, settings, device=device_used, resume=resume, num_workers=num_workers,
        record=record,
    )  # fmt: skip
    typer.echo(f"fine-tuned top1 {metrics['top1']:.2f} after {epochs} epochs")
    typer.echo(f"results in {out}")
    report_skipped(metrics)

"""The DINOv2 training loop: schedules, AdamW, EMA teacher, logging, checkpoints, exact resume, multi-process."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from dinoforge import distributed as dist_utils
from dinoforge.data.datasets import build_dataset, skipped_summary
from dinoforge.models.weights import load_backbone
from dinoforge.train.checkpoint import export_teacher, model_state, resume_training_state, save_training_state
from dinoforge.train.data import SeededAugment, StepSampler, crops_and_masks, seed_everything
from dinoforge.train.distributed import broadcast_module, fully_shard_model
from dinoforge.train.highres import CropPhase, check_crop_phases, switch_resolution
from dinoforge.train.logging import MetricsLog, Progress, StallMonitor, plot_curves
from dinoforge.train.meta_arch import SSLMetaArch
from dinoforge.train.precision import fsdp_param_dtype, resolve_cpu_autocast
from dinoforge.train.recipe import resolve_recipe
from dinoforge.train.schedules import build_schedulers, scaled_lr, total_iterations
from dinoforge.train.step import NonFiniteLoss, TrainStep, build_optimizer
from dinoforge.utils import DinoforgeError, eprint, progress_enabled, write_json


def _build_loader(
    cfg: DictConfig,
    dataset: Dataset,
    start_iter: int,
    world: int,
    rank: int,
    phase: CropPhase | None = None,
    device: torch.device | None = None,
) -> DataLoader:
    """The loader of iterations `start_iter` on at the crop sizes of `phase` (default: the base sizes)."""
    transform, collate = crops_and_masks(cfg, phase, device)
    sampler = StepSampler(len(dataset), cfg.train.batch_size_per_gpu, cfg.train.seed, rank, world, start_iter)
    workers = int(cfg.train.num_workers)
    return DataLoader(
        SeededAugment(dataset, transform),
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


SHOWN_LOSSES = (  # (label, metric) pairs on the progress bar
    ("loss", "total_loss"),
    ("dino", "dino_global_crops_loss"),
    ("ibot", "ibot_loss"),
    ("koleo", "koleo_loss"),
)


def _silent(*_: object) -> None:
    """The message sink of non-main ranks and quiet runs."""


def _finalise_config(
    cfg: DictConfig, output_dir: Path, n_images: int, world: int, main: bool, say, device, resume: bool
) -> object:
    """Fill in what depends on the run (the small recipe's derived values, the precision `auto` means on a CPU, the
    batch-scaled lr, the output folder), save the final config as config.yaml and return the per-iteration
    schedules."""
    resolved = resolve_recipe(cfg, n_images, world)
    if resolved:
        say(f"recipe {cfg.train.recipe}: " + " ".join(f"{k}={v}" for k, v in resolved.items()))
    saved = output_dir / "config.yaml"
    resolve_cpu_autocast(cfg, device, OmegaConf.load(saved) if resume and saved.is_file() else None, say)
    OmegaConf.set_struct(cfg, False)
    cfg.train.output_dir = str(output_dir)
    schedules = build_schedulers(cfg, world)
    cfg.optim.lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size_per_gpu * world, cfg.optim.scaling_rule)
    OmegaConf.set_struct(cfg, True)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml")
    return schedules


def train(
    cfg: DictConfig,
    output_dir: Path,
    data: str | None = None,
    resume: bool = False,
    quiet: bool = False,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
) -> dict:
    """Run (or resume) SSL pretraining; returns a summary with the final losses and the exported teacher path.

    Every `evaluation.eval_period_iterations` the teacher backbone is exported, and `evaluate` (if given) is called
    on it and on the final teacher; what it returns is logged (metrics.csv, curves.png), written beside the export,
    and the final result is the summary's "eval"."""
    device = dist_utils.init_from_env()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    main = rank == 0
    say = eprint if main and not quiet else _silent
    output_dir = Path(output_dir)
    dataset = build_dataset(data or cfg.train.dataset_path, transform=None, split="train")
    schedules = _finalise_config(cfg, output_dir, len(dataset), world, main, say, device, resume)

    phases = check_crop_phases(cfg)
    seed_everything(cfg.train.seed)
    model = SSLMetaArch(cfg)
    if cfg.student.pretrained_weights:
        say(model.load_pretrained(cfg.student.pretrained_weights))
    model.to(device).train()
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    max_iter = total_iterations(cfg)
    ckpt_period = cfg.train.checkpoint_period_iterations or 3 * epoch_len

    sharded = world > 1 and cfg.train.distributed == "fsdp"
    if sharded and len(phases) > 1:
        raise DinoforgeError("crops.highres resizes parameters in place: use train.distributed=ddp, not fsdp")
    if sharded:
        fully_shard_model(model, fsdp_param_dtype(cfg, device))
    else:
        broadcast_module(model)
    optimizer = build_optimizer(cfg, model, fused=not sharded)  # after sharding: FSDP2 swaps the parameters

    ckpt_dir = output_dir / "checkpoints"
    start_iter, last_ckpt = 0, None
    if resume:
        start_iter, last_ckpt = resume_training_state(ckpt_dir, cfg, model, optimizer, sharded, rank, say)
    step = TrainStep(cfg, model, optimizer, schedules, device, sharded)

    def to_phase(phase: CropPhase) -> None:
        if model.arch["img_size"] != phase.global_size:
            switch_resolution(model, optimizer, phase.global_size)
            say(f"iteration {phase.start}: {phase.global_size}/{phase.local_size} px crops, position embedding resized")

    batches = _phase_batches(cfg, dataset, phases, start_iter, max_iter, world, rank, to_phase, device)
    log = MetricsLog(output_dir, start_iter, enabled=main)
    progress = Progress(max_iter, start_iter, enabled=main and not quiet and progress_enabled())
    monitor = StallMonitor(max_iter, cfg.train.recipe, warn=main and not quiet)
    last: dict[str, float] = {}
    skipped: dict[int, None] = {}  # dataset indices of unreadable images, in the order met (each once)
    t0, n_images, step_s = time.perf_counter(), 0, 0.0  # images/s of the whole loop and of the step alone
    try:
        for it, batch in batches:
            skipped.update(dict.fromkeys(batch["skipped"]))
            if not dist_utils.all_ranks("collated_global_crops" in batch):  # one rank with nothing: all skip
                continue
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            t_step = time.perf_counter()
            try:
                values = step(it, batch)
            except NonFiniteLoss as e:
                raise DinoforgeError(f"{e}; last good checkpoint: {last_ckpt or 'none'}") from None
            step_s += time.perf_counter() - t_step

            n_images += batch["collated_global_crops"].shape[0] // 2 * world
            ips = n_images / (time.perf_counter() - t0)
            last = {**values, "images_per_s": ips, "step_images_per_s": n_images / step_s}
            if it % cfg.train.log_period_iterations == 0 or it == max_iter - 1:
                last["stalled"] = monitor.check(it, values)
                log.log(it, last)
            progress.update(
                " ".join(f"{name} {values.get(key, 0):.3f}" for name, key in SHOWN_LOSSES)
                + f" lr {values['lr']:.2e} {ips:.0f} img/s"
            )
            if (it + 1) % ckpt_period == 0 or it == max_iter - 1:
                last_ckpt = save_training_state(cfg, model, optimizer, it, ckpt_dir, sharded, main)
            eval_period = cfg.evaluation.eval_period_iterations
            if eval_period > 0 and (it + 1) % eval_period == 0 and it != max_iter - 1:
                _periodic_eval(model, it, output_dir, sharded, main, device, log, evaluate)
    finally:
        progress.close()
    state = model_state(model, sharded)
    teacher_path = output_dir / "teacher_backbone.safetensors"
    summary = {
        "iterations": max_iter,
        "last": last,
        **skipped_summary([dataset.item_name(i) for part in dist_utils.gather_objects(list(skipped)) for i in part]),
        "warnings": list(monitor.warnings.values()),
        "teacher": str(teacher_path),
    }
    if main:
        export_teacher(state, model.arch, teacher_path, model.export_prefix)
        if evaluate is not None:
            summary["eval"] = evaluate(load_backbone(str(teacher_path), device=str(device)))
            log.log(max_iter - 1, summary["eval"])
        summary["curves"] = str(plot_curves(log.rows, output_dir / "curves.png"))
        write_json(output_dir / "train_summary.json", summary)
    log.close()
    dist_utils.barrier()
    return summary


def _phase_batches(
    cfg, dataset, phases: list[CropPhase], start_iter: int, max_iter: int, world, rank, to_phase, device=None
):
    """(iteration, batch) from `start_iter` to the end, one loader per crop phase; `to_phase(phase)` is called
    before the first batch of each phase run here (the switch to high resolution)."""
    ends = [p.start for p in phases[1:]] + [max_iter]
    for phase, end in zip(phases, ends, strict=True):
        first = max(phase.start, start_iter)
        if first >= end:
            continue
        to_phase(phase)
        loader = _build_loader(cfg, dataset, first, world, rank, phase, device)
        yield from zip(range(first, end), map(loader.collate_fn.finish, loader), strict=False)


def _periodic_eval(model, it: int, output_dir: Path, sharded: bool, main: bool, device, log, evaluate) -> None:
    """Export the teacher backbone and, when the caller passed an `evaluate` callback, log what it measures."""
    state = model_state(model, sharded)
    if not main:
        return
    eval_dir = output_dir / "eval" / f"training_{it}"
    path = export_teacher(state, model.arch, eval_dir / "teacher_backbone.safetensors", model.export_prefix)
    if evaluate is not None:
        metrics = evaluate(load_backbone(str(path), device=str(device)))
        write_json(eval_dir / "metrics.json", {"iteration": it, **metrics})
        log.log(it, metrics)

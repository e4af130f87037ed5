"""High-resolution adaptation inside one run (DINOv2 §4): the last `crops.highres.iterations` iterations train at
larger crops. At the switch the position embeddings of the student and its EMA are resized once to the new patch
grid, with AdamW's moments of them; every schedule and the rest of the optimizer state carry on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from dinoforge.models.vision_transformer import resize_pos_embed
from dinoforge.train.schedules import total_iterations
from dinoforge.utils import DinoforgeError


@dataclass(frozen=True)
class CropPhase:
    """The crop sizes (and blur scale) from iteration `start` on."""

    start: int
    global_size: int
    local_size: int
    blur_sigma_scale: float


def crop_phases(cfg: Mapping | DictConfig) -> list[CropPhase]:
    """The run's crop phases, in order: the base sizes from iteration 0, then the high-res ones for the last
    `crops.highres.iterations` iterations when that is > 0. Works on a saved checkpoint's config dict too."""
    crops = cfg["crops"]
    base = CropPhase(
        0, crops["global_crops_size"], crops.get("local_crops_size", 0), crops.get("blur_sigma_scale", 1.0)
    )
    hr = crops.get("highres") or {}
    n = hr.get("iterations", 0)
    if not n:
        return [base]
    max_iter = total_iterations(cfg)
    blur = hr["blur_sigma_scale"] or base.blur_sigma_scale
    return [base, CropPhase(max_iter - int(n), hr["global_crops_size"], hr["local_crops_size"], blur)]


def global_size_at(cfg: Mapping | DictConfig, iteration: int) -> int:
    """The global crop size (the position embedding's side) a run trains at in `iteration`."""
    return [p for p in crop_phases(cfg) if p.start <= iteration][-1].global_size


def check_crop_phases(cfg: DictConfig) -> list[CropPhase]:
    """`crop_phases` of a finalised config, each size checked before the first step: one-line errors."""
    p = cfg.student.patch_size
    max_iter = total_iterations(cfg)
    hr = cfg.crops.highres
    if hr.iterations:
        if not 0 < hr.iterations < max_iter:
            raise DinoforgeError(
                f"crops.highres.iterations={hr.iterations} must be between 1 and {max_iter - 1}: "
                f"the run has {max_iter} iterations and starts at the base crop size"
            )
        g, loc = cfg.crops.global_crops_size, cfg.crops.local_crops_size
        if hr.global_crops_size <= g:
            raise DinoforgeError(
                f"crops.highres.global_crops_size={hr.global_crops_size} must be larger than "
                f"crops.global_crops_size={g}"
            )
        if not loc <= hr.local_crops_size <= hr.global_crops_size:
            raise DinoforgeError(
                f"crops.highres.local_crops_size={hr.local_crops_size} must be between crops.local_crops_size={loc} "
                f"and crops.highres.global_crops_size={hr.global_crops_size}"
            )
        if hr.blur_sigma_scale < 0:
            raise DinoforgeError(f"crops.highres.blur_sigma_scale={hr.blur_sigma_scale} must be >= 0 (0 = the base)")
    phases = crop_phases(cfg)
    for phase, where in zip(phases, ("crops", "crops.highres"), strict=False):
        if phase.global_size % p or phase.local_size % p:
            raise DinoforgeError(
                f"{where}.global_crops_size and local_crops_size ({phase.global_size}, {phase.local_size}) must be "
                f"multiples of student.patch_size {p}"
            )
    return phases


@torch.no_grad()
def switch_resolution(model: torch.nn.Module, optimizer: torch.optim.Optimizer, global_size: int) -> None:
    """Resize the student's and its EMA's position embeddings, and AdamW's moments of the student's, to
    `global_size` crops in place; the second moment is floored at its old minimum (no negative variance)."""
    student = model.student.backbone
    ema = model.ema.backbone
    n_old = student.pos_embed.shape[1]
    for backbone in (student, ema):
        backbone.set_img_size(global_size)
    model.arch["img_size"] = global_size
    state = optimizer.state.get(student.pos_embed, {})
    if not state:
        return
    side = global_size // student.patch_size
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        t = state.get(key)
        if t is None or t.shape[1] != n_old:
            continue
        resized = resize_pos_embed(t, (side, side), student.interpolate_offset, student.interpolate_antialias).to(t)
        state[key] = resized if key == "exp_avg" else resized.clamp_min(t.min())

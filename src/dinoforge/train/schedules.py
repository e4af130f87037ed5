"""Per-iteration schedules of the DINOv2 recipe: lr, weight decay, teacher momentum and temperature."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from dinoforge.utils import DinoforgeError


class CosineScheduler:
    """`freeze_iters` zeros, a linear warm-up to `base_value`, then a half-cosine to `final_value` (past `total_iters`:
    `final_value`); the official `CosineScheduler`'s values."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0,
        freeze_iters: int = 0,
    ) -> None:
        n_cosine = total_iters - warmup_iters - freeze_iters
        if n_cosine < 0:
            raise DinoforgeError(
                f"schedule too short: {total_iters} iterations cannot hold {freeze_iters} frozen "
                f"+ {warmup_iters} warm-up iterations"
            )
        self.final_value = final_value
        self.total_iters = total_iters
        steps = np.arange(n_cosine)
        cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(n_cosine, 1)))
        self.schedule = np.concatenate(
            (np.zeros(freeze_iters), np.linspace(start_warmup_value, base_value, warmup_iters), cosine)
        )

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return float(self.final_value)
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


def scaled_lr(base_lr: float, batch_size_total: int, scaling_rule: str | None = "sqrt_wrt_1024") -> float:
    """The official lr scaling: base_lr · sqrt(total batch / 1024) for "sqrt_wrt_1024"; unchanged for None."""
    if scaling_rule in (None, "", "none"):
        return float(base_lr)
    if scaling_rule == "sqrt_wrt_1024":
        return float(base_lr) * math.sqrt(batch_size_total / 1024.0)
    raise DinoforgeError(f"unknown optim.scaling_rule {scaling_rule!r} (expected 'sqrt_wrt_1024' or 'none')")


def total_iterations(cfg: Mapping[str, Any]) -> int:
    """The run's length in iterations: `train.max_iterations` when > 0 (a budget in steps, e.g. fitted to a time
    budget), else `optim.epochs` × `train.OFFICIAL_EPOCH_LENGTH`. Works on a saved checkpoint's config dict too."""
    fixed = int(cfg["train"].get("max_iterations", 0) or 0)
    return fixed if fixed > 0 else int(cfg["optim"]["epochs"]) * int(cfg["train"]["OFFICIAL_EPOCH_LENGTH"])


@dataclass(frozen=True)
class Schedules:
    """The five schedules the training loop reads at each iteration."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler


def build_schedulers(cfg: Mapping[str, Any], world_size: int = 1) -> Schedules:
    """The official recipe's per-iteration schedules (lr scaled for the global batch, weight decay, last-layer lr,
    EMA momentum, teacher temperature) from the `optim`, `teacher` and `train` keys."""
    optim, teacher, train = cfg["optim"], cfg["teacher"], cfg["train"]
    epoch = int(train["OFFICIAL_EPOCH_LENGTH"])
    total = total_iterations(cfg)
    rule = optim.get("scaling_rule", "sqrt_wrt_1024")
    base = optim["base_lr"] if rule not in (None, "", "none") else optim["lr"]
    peak_lr = scaled_lr(base, int(train["batch_size_per_gpu"]) * world_size, rule)
    lr_args = dict(
        base_value=peak_lr,
        final_value=float(optim["min_lr"]),
        total_iters=total,
        warmup_iters=int(optim["warmup_epochs"]) * epoch,
    )
    last_layer_lr = CosineScheduler(**lr_args)
    last_layer_lr.schedule[: int(optim["freeze_last_layer_epochs"]) * epoch] = 0.0
    temp_iters = int(teacher["warmup_teacher_temp_epochs"]) * epoch
    return Schedules(
        lr=CosineScheduler(**lr_args),
        wd=CosineScheduler(float(optim["weight_decay"]), float(optim["weight_decay_end"]), total),
        momentum=CosineScheduler(float(teacher["momentum_teacher"]), float(teacher["final_momentum_teacher"]), total),
        teacher_temp=CosineScheduler(
            float(teacher["teacher_temp"]),
            float(teacher["teacher_temp"]),
            temp_iters,
            warmup_iters=temp_iters,
            start_warmup_value=float(teacher["warmup_teacher_temp"]),
        ),
        last_layer_lr=last_layer_lr,
    )

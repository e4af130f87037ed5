"""`train.recipe=small`: the DINOv2 recipe re-expressed relative to the run, for short runs and small data sets.

The official values are tuned for 125k-iteration ImageNet-scale runs of 224 px crops. On a run of a few hundred
steps they leave the DINO loss at log K: the EMA teacher (momentum 0.992 → 1) moves less than its own random init
over the whole run, LayerScale 1e-5 gives every image the same CLS token so Sinkhorn-Knopp targets are exactly
uniform, the init's fixed 0.02 std (xavier's at ViT-L width) leaves a narrow net's blocks adding ~1 % to the residual
stream, and the blur's sigma range is 9× too strong for 24 px crops. The small recipe derives these values from
the data set size, the batch, the step budget and the crop size instead; it never touches the official path.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from dinoforge.data.augment import BLUR_SIGMA_CROP
from dinoforge.utils import DinoforgeError

RECIPES = ("official", "small")


def prototypes_for(n_rows: int) -> int:
    """Prototype count for a batch of `n_rows` teacher rows (2 global crops per image): the power of two nearest
    to the row count, so Sinkhorn-Knopp's balanced assignment can give each row its own prototype."""
    return 2 ** max(4, round(math.log2(max(n_rows, 16))))


def resolve_recipe(cfg: DictConfig, n_images: int, world: int = 1) -> dict[str, object]:
    """Rewrite `cfg` in place for `train.recipe` (small: schedules, LayerScale, the backbone's init, blur and
    prototypes derived from the run, docs/reports/learning.md); returns the keys it set (none for the official one)."""
    recipe = cfg.train.recipe
    if recipe not in RECIPES:
        raise DinoforgeError(f"unknown train.recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if recipe == "official":
        return {}
    batch = int(cfg.train.batch_size_per_gpu) * world
    epoch_len = max(1, n_images // batch)
    steps = int(cfg.train.max_iterations) or int(cfg.optim.epochs) * epoch_len
    k = prototypes_for(2 * batch)
    knobs = cfg.train.small_recipe
    values = {
        "train.OFFICIAL_EPOCH_LENGTH": epoch_len,
        "teacher.momentum_teacher": round(1.0 - 1.0 / max(knobs.ema_horizon * steps, 1.0), 6),
        "teacher.final_momentum_teacher": 1.0,
        "teacher.teacher_temp": knobs.teacher_temp,
        "teacher.warmup_teacher_temp": knobs.teacher_temp,
        "teacher.warmup_teacher_temp_epochs": 0,
        "student.layerscale": knobs.layerscale,
        "student.init": knobs.init,
        "crops.blur_sigma_scale": round(cfg.crops.global_crops_size / BLUR_SIGMA_CROP, 4),
        "dino.head_n_prototypes": k,
        "ibot.head_n_prototypes": k,
    }
    if cfg.crops.highres.iterations:
        values["crops.highres.blur_sigma_scale"] = round(cfg.crops.highres.global_crops_size / BLUR_SIGMA_CROP, 4)
    OmegaConf.set_struct(cfg, False)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.set_struct(cfg, True)
    return values

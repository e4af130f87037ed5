"""train.recipe: the small-data recipe's values, hand-computed for the demo; the official recipe changes nothing."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from dinoforge.config.config import PRESETS, load_config
from dinoforge.train.recipe import prototypes_for, resolve_recipe
from dinoforge.utils import DinoforgeError


def test_small_recipe_values_for_the_demo():
    cfg = load_config("demo", ["train.recipe=small", "optim.epochs=2"])
    set_ = resolve_recipe(cfg, n_images=10_000)
    # 10,000 images / 128 a step = 78 steps an epoch, 156 in all; EMA time constant 0.2 · 156 = 31.2 steps
    assert cfg.train.OFFICIAL_EPOCH_LENGTH == 78
    assert cfg.teacher.momentum_teacher == pytest.approx(1 - 1 / 31.2, abs=1e-6)
    assert cfg.teacher.final_momentum_teacher == 1.0
    assert cfg.teacher.teacher_temp == cfg.teacher.warmup_teacher_temp
    assert cfg.teacher.warmup_teacher_temp_epochs == 0
    assert cfg.student.layerscale == 0.1
    assert cfg.student.init == "xavier"
    assert cfg.crops.blur_sigma_scale == pytest.approx(24 / 224, abs=1e-4)
    assert cfg.dino.head_n_prototypes == cfg.ibot.head_n_prototypes == 256  # 2 crops × 128 rows
    assert set(set_) >= {"teacher.momentum_teacher", "student.layerscale", "dino.head_n_prototypes"}
    # two processes: the global batch doubles, so the epoch halves and the heads get 512 prototypes
    cfg2 = load_config("demo", ["train.recipe=small"])
    resolve_recipe(cfg2, n_images=10_000, world=2)
    assert cfg2.train.OFFICIAL_EPOCH_LENGTH == 39 and cfg2.dino.head_n_prototypes == 512


def test_small_recipe_knobs_vary_the_recipe():
    # the knobs are the way to vary the recipe; the keys it derives are set over any value given for them
    knobs = [
        "train.small_recipe.ema_horizon=0.5",
        "train.small_recipe.teacher_temp=0.05",
        "train.small_recipe.layerscale=1e-5",
        "train.small_recipe.init=official",
    ]
    cfg = load_config("demo", ["train.recipe=small", "optim.epochs=2", "student.layerscale=0.5", *knobs])
    resolve_recipe(cfg, n_images=10_000)
    assert cfg.teacher.momentum_teacher == pytest.approx(1 - 1 / (0.5 * 156), abs=1e-6)
    assert cfg.teacher.teacher_temp == cfg.teacher.warmup_teacher_temp == 0.05
    assert cfg.student.layerscale == 1e-5
    assert cfg.student.init == "official"


def test_prototypes_follow_the_batch():
    assert [prototypes_for(n) for n in (2, 100, 256, 300, 400, 2048)] == [16, 128, 256, 256, 512, 2048]


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "demo"])
def test_official_recipe_changes_nothing(preset):
    cfg = load_config(preset)
    before = OmegaConf.to_container(cfg)
    assert cfg.train.recipe == "official"
    assert resolve_recipe(cfg, n_images=1_281_167, world=8) == {}
    assert OmegaConf.to_container(cfg) == before


def test_unknown_recipe_is_named():
    cfg = load_config("demo", ["train.recipe=tiny"])
    with pytest.raises(DinoforgeError, match="unknown train.recipe 'tiny'"):
        resolve_recipe(cfg, n_images=100)

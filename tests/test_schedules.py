"""Schedules at hand-computed points, equality with the official CosineScheduler, and the recipe's five."""

import math
from pathlib import Path

import dinov2
import numpy as np
import pytest
from dinov2.utils.utils import CosineScheduler as OfficialScheduler
from omegaconf import OmegaConf

from dinoforge.train.schedules import CosineScheduler, build_schedulers, scaled_lr
from dinoforge.utils import DinoforgeError


def test_hand_computed_points():
    s = CosineScheduler(1.0, 0.0, total_iters=10, warmup_iters=2, start_warmup_value=0.5)
    assert s[0] == 0.5 and s[1] == 1.0  # linspace(0.5, 1, 2)
    assert s[2] == 1.0  # cosine starts at the base value
    assert s[6] == pytest.approx(0.5)  # halfway through the 8 cosine steps: cos(pi/2) = 0
    assert s[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert s[10] == 0.0 and s[10_000] == 0.0  # clamped to the final value
    frozen = CosineScheduler(2.0, 1.0, total_iters=6, warmup_iters=1, freeze_iters=3)
    assert [frozen[i] for i in range(4)] == [0.0, 0.0, 0.0, 0.0]  # 3 frozen + warm-up starting at 0
    assert frozen[4] == 2.0 and frozen[5] == pytest.approx(1.5)


def test_equal_to_official():
    for args in (
        (0.004, 1e-6, 100, 10, 0.0, 0),
        (0.04, 0.4, 37),
        (0.04, 0.07, 30, 30, 0.04),
        (1.0, 0.5, 9, 2, 0.1, 3),
    ):
        ours, ref = CosineScheduler(*args), OfficialScheduler(*args)
        np.testing.assert_allclose([ours[i] for i in range(args[2] + 3)], [ref[i] for i in range(args[2] + 3)])


def test_too_short_schedule_is_a_user_error():
    with pytest.raises(DinoforgeError, match="schedule too short"):
        CosineScheduler(1.0, 0.0, total_iters=5, warmup_iters=6)


def test_sqrt_scaling():
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)
    assert scaled_lr(0.004, 256, None) == 0.004
    with pytest.raises(DinoforgeError):
        scaled_lr(0.004, 256, "linear")


def test_recipe_schedules_from_the_official_default_config():
    cfg = OmegaConf.load(Path(dinov2.__file__).parent / "configs" / "ssl_default_config.yaml")
    cfg.train.OFFICIAL_EPOCH_LENGTH = 10
    cfg.optim.epochs, cfg.optim.warmup_epochs, cfg.teacher.warmup_teacher_temp_epochs = 20, 2, 4
    cfg.train.batch_size_per_gpu = 64
    s = build_schedulers(cfg, world_size=4)  # total batch 256: lr = 0.004 * sqrt(1/4) = 0.002
    assert s.lr[0] == 0.0 and s.lr[19] == pytest.approx(0.002) and s.lr[20] == pytest.approx(0.002)
    assert s.lr[110] == pytest.approx(1e-6 + 0.5 * (0.002 - 1e-6))  # middle of the 180 cosine steps
    assert s.lr[200] == pytest.approx(1e-6)
    assert s.wd[0] == pytest.approx(0.04) and s.wd[100] == pytest.approx(0.22) and s.wd[200] == pytest.approx(0.4)
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[100] == pytest.approx(0.996)
    assert s.momentum[10_000] == 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04) and s.teacher_temp[39] == pytest.approx(0.07)
    assert s.teacher_temp[20] == pytest.approx(0.04 + 0.03 * 20 / 39)  # linspace(0.04, 0.07, 40)
    assert s.teacher_temp[40] == s.teacher_temp[150] == pytest.approx(0.07)
    assert all(s.last_layer_lr[i] == 0.0 for i in range(10))  # frozen for the first epoch
    assert s.last_layer_lr[10] == s.lr[10] > 0 and s.last_layer_lr[150] == s.lr[150]


def test_plain_dict_config_without_scaling():
    cfg = {
        "optim": {
            "epochs": 2, "warmup_epochs": 0, "lr": 0.01, "base_lr": 99.0, "min_lr": 0.0,
            "scaling_rule": "none",
            "weight_decay": 0.04, "weight_decay_end": 0.4, "freeze_last_layer_epochs": 0,
        },
        "teacher": {"momentum_teacher": 0.9, "final_momentum_teacher": 1.0, "teacher_temp": 0.07,
                    "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0},
        "train": {"OFFICIAL_EPOCH_LENGTH": 5, "batch_size_per_gpu": 8},
    }  # fmt: skip
    s = build_schedulers(cfg)
    assert s.lr[0] == 0.01 and s.last_layer_lr[0] == 0.01
    assert s.teacher_temp[0] == 0.07  # no warm-up: constant from the start


def test_max_iterations_sets_the_run_length_and_its_schedules():
    from dinoforge.config.config import load_config
    from dinoforge.train.recipe import resolve_recipe
    from dinoforge.train.schedules import total_iterations

    cfg = load_config("demo")
    assert total_iterations(cfg) == 4 * 78  # epochs × OFFICIAL_EPOCH_LENGTH when unset
    cfg = load_config("demo", ["train.max_iterations=50"])
    resolve_recipe(cfg, 10_000)  # the small recipe derives the teacher's EMA horizon from the 50 steps
    assert total_iterations(cfg) == 50
    assert cfg.teacher.momentum_teacher == pytest.approx(1 - 1 / (0.2 * 50))
    s = build_schedulers(cfg)
    assert len(s.lr) == len(s.wd) == len(s.momentum) == 50
    assert s.lr[0] > s.lr[49] > s.lr[50] == cfg.optim.min_lr  # the cosine ends at step 50, not at 312

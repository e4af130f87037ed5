"""student.init: the xavier scheme draws each weight within its hand-computed xavier bound, at xavier's spread, and
reaches the student and teacher of a small-recipe run; the official scheme is left as the official code draws it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinoforge.config.config import load_config
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.train.meta_arch import SSLMetaArch
from dinoforge.train.recipe import resolve_recipe
from dinoforge.utils import DinoforgeError

ARCH = dict(img_size=32, patch_size=4, embed_dim=128, depth=2, num_heads=4, init_values=0.1)


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_xavier_draws_within_the_hand_computed_bounds():
    torch.manual_seed(0)
    net = DinoVisionTransformer(**ARCH)
    net.init_weights("xavier")
    # qkv 128 → 384, proj 128 → 128, fc1 128 → 512, fc2 512 → 128; patch embedding 3·4·4 = 48 → 128
    expected = {
        "blocks.0.attn.qkv.weight": _xavier_bound(128, 384),
        "blocks.0.attn.proj.weight": _xavier_bound(128, 128),
        "blocks.0.mlp.fc1.weight": _xavier_bound(128, 512),
        "blocks.0.mlp.fc2.weight": _xavier_bound(512, 128),
        "patch_embed.proj.weight": _xavier_bound(48, 128),
    }
    sd = net.state_dict()
    for name, bound in expected.items():
        w = sd[name]
        assert w.abs().max() <= bound, name
        # uniform on [-b, b] has std b/√3; thousands of draws put the sample std within 5 % of it
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
    assert sd["cls_token"].std().item() == pytest.approx(0.02, rel=0.3)  # 128 draws of N(0, 0.02)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in net.modules() if isinstance(m, nn.Linear))
    assert torch.equal(sd["mask_token"], torch.zeros_like(sd["mask_token"]))


def test_official_scheme_keeps_the_official_spread():
    torch.manual_seed(0)
    net = DinoVisionTransformer(**ARCH)
    w = net.state_dict()["blocks.0.mlp.fc1.weight"]
    assert w.std().item() == pytest.approx(0.02, rel=0.05)  # trunc-normal 0.02, whatever the width
    assert net.state_dict()["cls_token"].abs().max() < 1e-4  # N(0, 1e-6)


def test_unknown_init_is_named():
    with pytest.raises(DinoforgeError, match="unknown init 'he'"):
        DinoVisionTransformer(**ARCH).init_weights("he")
    with pytest.raises(DinoforgeError, match="unknown init"):
        SSLMetaArch(load_config("demo", ["student.init=he"]))


def test_small_recipe_student_and_teacher_start_from_xavier():
    cfg = load_config("demo", ["optim.epochs=1"])
    resolve_recipe(cfg, n_images=10_000)
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    student, teacher = model.student.backbone.state_dict(), model.teacher.backbone.state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    fc1 = student["blocks.0.mlp.fc1.weight"]
    assert fc1.std().item() == pytest.approx(_xavier_bound(128, 512) / math.sqrt(3), rel=0.05)

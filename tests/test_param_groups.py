"""Param groups: layer-wise lr decay, patch-embed multiplier, weight-decay exclusions, last-layer flags;
compared with hand-computed multipliers and with the official dinov2 get_params_groups_with_decay."""

import pytest
import torch
from dinov2.models.vision_transformer import DinoVisionTransformer as OfficialViT
from dinov2.utils import param_groups as official
from torch import nn

from dinoforge.models.heads import DINOHead
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.train.param_groups import (
    apply_optim_scheduler,
    fuse_params_groups,
    get_params_groups_with_decay,
    vit_layer_id,
)

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, init_values=1.0)


def _student(**kw) -> nn.ModuleDict:
    return nn.ModuleDict(
        {
            "backbone": DinoVisionTransformer(**(TINY | kw)),
            "dino_head": DINOHead(32, 20, hidden_dim=16, bottleneck_dim=8),
            "ibot_head": DINOHead(32, 20, hidden_dim=16, bottleneck_dim=8),
        }
    )


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_hand_computed_multipliers():
    groups = _by_name(get_params_groups_with_decay(_student(), lr_decay_rate=0.5, patch_embed_lr_mult=0.2))
    lr = {n: g["lr_multiplier"] for n, g in groups.items()}
    assert lr["backbone.pos_embed"] == lr["backbone.cls_token"] == lr["backbone.mask_token"] == 0.5**4
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.5**4 * 0.2)
    assert lr["backbone.blocks.0.attn.qkv.weight"] == 0.5**3
    assert lr["backbone.blocks.2.mlp.fc2.bias"] == 0.5**1
    assert lr["backbone.norm.weight"] == 1.0
    assert lr["dino_head.mlp.0.weight"] == lr["ibot_head.last_layer.weight_v"] == 1.0
    wd = {n: g["wd_multiplier"] for n, g in groups.items()}
    assert wd["backbone.blocks.0.attn.qkv.weight"] == wd["backbone.cls_token"] == wd["dino_head.mlp.0.weight"] == 1
    assert wd["backbone.blocks.0.attn.qkv.bias"] == wd["backbone.blocks.1.norm1.weight"] == 0
    assert wd["backbone.blocks.1.ls1.gamma"] == wd["backbone.norm.bias"] == wd["dino_head.mlp.2.bias"] == 0
    last = {n for n, g in groups.items() if g["is_last_layer"]}
    assert last == {f"{h}.last_layer.weight_{p}" for h in ("dino_head", "ibot_head") for p in "gv"}


def test_equal_to_official_on_the_same_model():
    model = _student()
    ours = get_params_groups_with_decay(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    ref = official.get_params_groups_with_decay(model, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    assert [g["name"] for g in ours] == [g["name"] for g in ref]
    for a, b in zip(ours, ref, strict=True):
        assert a["params"] is b["params"]
        for key in ("lr_multiplier", "wd_multiplier", "is_last_layer"):
            assert a[key] == pytest.approx(b[key]), (a["name"], key)


def test_register_tokens_are_embeddings_and_bare_backbone_works():
    backbone = DinoVisionTransformer(**(TINY | {"num_register_tokens": 2}))
    groups = _by_name(get_params_groups_with_decay(backbone, lr_decay_rate=0.5))
    assert groups["register_tokens"]["lr_multiplier"] == 0.5**4  # official: 1.0 (missed by its name test)
    assert groups["blocks.1.attn.proj.weight"]["lr_multiplier"] == 0.5**2


def test_chunked_blocks_use_the_global_block_index():
    chunked = OfficialViT(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, block_chunks=2)
    groups = _by_name(get_params_groups_with_decay(chunked, lr_decay_rate=0.5))
    assert groups["blocks.0.1.attn.qkv.weight"]["lr_multiplier"] == 0.5**3  # block 1
    assert groups["blocks.1.3.attn.qkv.weight"]["lr_multiplier"] == 0.5**1  # block 3 (last), in chunk 1
    assert vit_layer_id("blocks.1.3.mlp.fc1.weight", 4) == vit_layer_id("blocks.3.mlp.fc1.weight", 4) == 4


def test_fused_groups_drive_adamw():
    model = _student()
    model["backbone"].mask_token.requires_grad_(False)
    groups = get_params_groups_with_decay(model, lr_decay_rate=0.5, patch_embed_lr_mult=0.2)
    assert "backbone.mask_token" not in {g["name"] for g in groups}
    fused = fuse_params_groups(groups)
    keys = {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}
    assert len(fused) == len(keys)
    assert sum(len(g["params"]) for g in fused) == len(groups)
    opt = torch.optim.AdamW(fused)
    apply_optim_scheduler(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 1e-3 * g["lr_multiplier"]
        assert g["lr"] == pytest.approx(expected_lr) and g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    before = model["dino_head"].last_layer.weight_v.detach().clone()
    sum(p.sum() for p in model.parameters() if p.requires_grad).backward()
    opt.step()
    assert torch.equal(model["dino_head"].last_layer.weight_v, before)  # last layer lr 0: frozen

"""Optimizer parameter groups of the DINOv2 recipe: layer-wise lr decay, patch-embed lr multiplier, no weight
decay on biases / norms / LayerScale, and a flag for the heads' last layers (frozen early by their lr)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "cls_token", "mask_token", "register_tokens")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.(\d+))?(?:\.|$)")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Depth index of a backbone parameter (name relative to the backbone): 0 for embeddings and tokens, i+1 for
    block i (also in the official chunked layout), num_layers+1 else."""
    if any(part in _EMBEDDING_NAMES for part in name.split(".")):
        return 0
    match = _BLOCK.search(name)
    if match:
        return int(match.group(2) if match.group(2) is not None else match.group(1)) + 1
    return num_layers + 1


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """lr multiplier lr_decay_rate^(num_layers + 1 − layer id) of a backbone parameter (1 for the norm)."""
    return lr_decay_rate ** (num_layers + 1 - vit_layer_id(name, num_layers))


def _find_backbone(model: nn.Module) -> tuple[str, int]:
    """(name prefix, depth) of the first ViT backbone in `model` (a module with blocks and patch_embed)."""
    for prefix, module in model.named_modules():
        if hasattr(module, "blocks") and hasattr(module, "patch_embed"):
            depth = getattr(module, "n_blocks", None)
            if depth is None:
                depth = sum(1 for b in module.blocks.modules() if hasattr(b, "attn") and hasattr(b, "mlp"))
            return prefix, int(depth)
    return "", 0


def _clean(name: str) -> str:
    for wrapper in _WRAPPER_PREFIXES:
        name = name.replace(wrapper, "")
    return name


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """One dict per trainable parameter (params, name, lr_multiplier, wd_multiplier, is_last_layer): layer-wise lr
    decay on the backbone, no weight decay on biases, norms and LayerScale, `patch_embed_lr_mult` on the patch embed."""
    backbone_prefix, depth = _find_backbone(model)
    prefix = f"{_clean(backbone_prefix)}." if backbone_prefix else ""
    groups = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _clean(raw_name)
        in_backbone = depth > 0 and name.startswith(prefix)
        lr_mult = get_vit_lr_decay_rate(name[len(prefix) :], lr_decay_rate, depth) if in_backbone else 1.0
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_mult,
                "wd_multiplier": 0.0 if no_decay else 1.0,
                "is_last_layer": "last_layer" in name,
            }
        )
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[dict[str, Any]],
    keys: Sequence[str] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> list[dict[str, Any]]:
    """Merge per-parameter dicts with equal `keys` values into optimizer param groups (fewer, larger)."""
    fused: dict[tuple, dict[str, Any]] = {}
    for group in all_params_groups:
        ident = tuple(group[k] for k in keys)
        if ident not in fused:
            fused[ident] = {k: group[k] for k in keys} | {"params": []}
        fused[ident]["params"].append(group["params"])
    return list(fused.values())


def apply_optim_scheduler(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set each group's lr (last-layer groups use `last_layer_lr`) and weight decay, times its multipliers."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group["wd_multiplier"]
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]

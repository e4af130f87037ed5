"""timm `vit_*_patch14_dinov2` / `vit_*_patch14_reg4_dinov2` state dicts to and from official keys.

timm's register models use `no_embed_class=True`: the CLS position embedding is folded into
`cls_token`, `pos_embed` covers patches only, registers are `reg_token`; the SwiGLU layers are
`mlp.fc1`/`mlp.fc2` (same packed order as `w12`/`w3`); there is no mask token.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_SWIGLU = {"w12": "fc1", "w3": "fc2"}  # official SwiGLU layer -> timm's name (both directions use it)


def _rename_swiglu(key: str, names: dict[str, str]) -> str:
    return re.sub(r"\.mlp\.(\w+)\.", lambda m: f".mlp.{names.get(m.group(1), m.group(1))}.", key)


def official_to_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official backbone state dict to a timm VisionTransformer state dict."""
    sd = {k: v.detach().cpu() for k, v in sd.items() if k != "mask_token"}
    out: dict[str, Tensor] = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    swiglu = any(".mlp.w12." in k for k in sd)
    for k, v in sd.items():
        out[_rename_swiglu(k, _SWIGLU) if swiglu else k] = v
    return {k: v.contiguous() for k, v in out.items()}


def timm_to_official(sd: dict[str, Tensor], swiglu: bool = False) -> dict[str, Tensor]:
    """Inverse of `official_to_timm` (mask_token comes back as zeros, as it is unused at inference)."""
    sd = dict(sd)
    out: dict[str, Tensor] = {}
    if "reg_token" in sd:
        pos = sd.pop("pos_embed")
        out["register_tokens"] = sd.pop("reg_token")
        # no_embed_class: CLS already carries its position; give it a zero slot in pos_embed
        out["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
        out["cls_token"] = sd.pop("cls_token")
    to_official = {timm: official for official, timm in _SWIGLU.items()}
    for k, v in sd.items():
        out[_rename_swiglu(k, to_official) if swiglu else k] = v
    out.setdefault("mask_token", torch.zeros(1, out["cls_token"].shape[-1]))
    return out

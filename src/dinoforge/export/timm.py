"""Export to a timm `vit_*_patch14[_reg4]_dinov2` state dict; the key names come from
dinoforge.models.formats.timm."""

from __future__ import annotations

from pathlib import Path

import torch

from dinoforge.models.formats.timm import official_to_timm
from dinoforge.utils import atomic_torch_save


def export_timm(model: torch.nn.Module, path: str | Path) -> Path:
    """Save as a timm `vit_*_patch14[_reg4]_dinov2` state dict (.pth, or .safetensors by suffix)."""
    sd = official_to_timm(model.state_dict())
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata={"format": "pt"})
        return path
    return atomic_torch_save(sd, path)

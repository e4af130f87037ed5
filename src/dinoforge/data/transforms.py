"""Eval transforms (the official resize/centre-crop recipe, an aspect-keeping patch-aligned variant, the one per data
spec that every evaluation uses) and the fine-tuning train transform."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dinoforge.utils import DinoforgeError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize_transform(
    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> transforms.Compose:
    """PIL image → float tensor in [0, 1] → normalised with ImageNet statistics."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])


def eval_transform(resize: int = 256, crop: int = 224) -> transforms.Compose:
    """The official classification eval transform: bicubic shorter-side resize, centre crop, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop),
            normalize_transform(),
        ]
    )


class PatchAlignedResize:
    """Resize the shorter side to `size` (bicubic, aspect kept), then centre-crop or zero-pad both sides to a
    multiple of `patch_size`, so a ViT sees the whole image at its native aspect ratio."""

    def __init__(self, size: int, patch_size: int = 14, mode: str = "crop") -> None:
        if mode not in ("crop", "pad"):
            raise DinoforgeError(f"mode must be 'crop' or 'pad', got {mode!r}")
        if size < patch_size:
            raise DinoforgeError(f"size {size} is smaller than the patch size {patch_size}")
        self.size, self.patch_size, self.mode = size, patch_size, mode
        self._resize = transforms.Resize(size, interpolation=InterpolationMode.BICUBIC)
        self._to_tensor = normalize_transform()

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = self._to_tensor(self._resize(img))
        h, w = x.shape[-2:]
        p = self.patch_size
        if self.mode == "crop":
            th, tw = h // p * p, w // p * p
            top, left = (h - th) // 2, (w - tw) // 2
            return x[..., top : top + th, left : left + tw]
        ph, pw = -h % p, -w % p
        # zero after normalisation is the mean colour, the most neutral padding for the network
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def __repr__(self) -> str:
        return f"PatchAlignedResize(size={self.size}, patch_size={self.patch_size}, mode={self.mode!r})"


def eval_transform_size(size: int, patch_size: int = 14, mode: str = "crop") -> PatchAlignedResize:
    """Aspect-keeping eval transform: shorter side → `size`, then crop (or pad) to patch multiples."""
    return PatchAlignedResize(size, patch_size, mode)


def eval_side(spec: str, image_size: int | None, patch_size: int) -> tuple[int, bool]:
    """(side in px, is the bundled set) of the evaluations' images for a data spec: the bundled set's canvas (native
    32 px or `image_size`) rounded up to the patch, else the centre crop (`image_size` or 224) rounded down to it."""
    if spec.split(":")[0] in ("bundled", "bundled-full") and not Path(spec).exists():
        return math.ceil((image_size or 32) / patch_size) * patch_size, True
    return max(patch_size, (image_size or 224) // patch_size * patch_size), False


def eval_transform_for(spec: str, image_size: int | None, patch_size: int) -> tuple[Any, int]:
    """(transform, bundled canvas size or 0) for a data spec: the bundled set drawn at its `eval_side` canvas, other
    data with the official resize (side * 256/224) + centre crop to `eval_side`."""
    side, bundled = eval_side(spec, image_size, patch_size)
    if bundled:
        return normalize_transform(), side
    return eval_transform(resize=round(side * 256 / 224), crop=side), 0


def embed_transform(data: str | None, size: int | None, patch_size: int) -> tuple[Any, int | None]:
    """(transform, bundled canvas or None) of `dinoforge embed` and `dinoforge.embed`: the bundled set at its native
    size rounded up to the patch, other images with the official resize 256 / crop 224, or an aspect-keeping `size`."""
    if data is not None and data.split(":")[0] in ("bundled", "bundled-full") and not Path(data).exists():
        return normalize_transform(), math.ceil((size or 32) / patch_size) * patch_size
    if size is None:
        return eval_transform(), None
    return eval_transform_size(size, patch_size), None


def finetune_transform(size: int, min_scale: float = 0.08) -> transforms.Compose:
    """Fine-tuning augmentation: a random resized crop (area `min_scale`..1 of the image, aspect 3/4..4/3, bicubic) to
    `size` px, a horizontal flip half the time, then the ImageNet normalisation."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            normalize_transform(),
        ]
    )


def denormalize(x: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """Undo the ImageNet normalisation of a [3,H,W] or [B,3,H,W] tensor; returns values clipped to [0, 1]."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * s + m).clamp(0, 1)

"""Batch collation for SSL training: stack multi-crop views and draw the iBOT masks of the global crops."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dinoforge.utils import DinoforgeError


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict[str, Any], Any] | None],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: Callable[[int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Collate `(crops, label)` samples into the official batch dict (crop-major: crop i of every image), with the
    iBOT masks of `mask_and_cast`. `None` samples (unreadable images) are dropped."""
    samples = [s for s in samples_list if s is not None]
    if not samples:
        raise DinoforgeError("every image in this batch failed to load; check the dataset for corrupt files")
    crops = [s[0] for s in samples]
    n_global, n_local = len(crops[0]["global_crops"]), len(crops[0]["local_crops"])
    global_crops = torch.stack([c["global_crops"][i] for i in range(n_global) for c in crops])
    if n_local:
        local_crops = torch.stack([c["local_crops"][i] for i in range(n_local) for c in crops])
    else:
        local_crops = global_crops.new_zeros((0,) + global_crops.shape[1:])
    return mask_and_cast(global_crops, local_crops, mask_ratio_tuple, mask_probability, dtype, n_tokens, mask_generator)


def mask_and_cast(
    global_crops: torch.Tensor,
    local_crops: torch.Tensor,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: Callable[[int], np.ndarray] | None = None,
) -> dict[str, Any]:
    """The official batch dict of stacked, crop-major crops, with block masks drawn for the global crops.

    A fraction `mask_probability` of the B·n_global global crops gets a block mask; their mask ratios are
    stratified: the k-th masked crop draws its ratio uniformly in the k-th of equal sub-intervals of
    `mask_ratio_tuple`, and the masks are shuffled over crops.
    Returns collated_global_crops, collated_local_crops, collated_masks [B·n_g, N], mask_indices_list (flat
    indices of masked tokens), masks_weight (1/masked count of the token's crop), upperbound (the most masked
    tokens this draw can give, for fixed-size buffers) and n_masked_patches ([1] tensor).
    """
    if mask_generator is None:
        raise DinoforgeError("mask_and_cast needs a mask_generator (e.g. dinoforge.data.masking)")
    if n_tokens is None:
        n_tokens = mask_generator.num_patches

    n_crops = global_crops.shape[0]
    n_masked_crops = int(n_crops * mask_probability)
    bounds = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked_crops + 1).tolist()
    masks, upperbound = [], 0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * random.uniform(lo, hi)))))
        upperbound += int(n_tokens * hi)
    masks += [torch.from_numpy(mask_generator(0)) for _ in range(n_crops - n_masked_crops)]
    random.shuffle(masks)

    collated_masks = torch.stack(masks).flatten(1)
    mask_indices = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices.shape[0], dtype=torch.long),
    }

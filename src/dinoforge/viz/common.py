"""Shared pieces of the figures: image preparation, per-image patch features, PCA."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from PIL import Image

from dinoforge.data.transforms import denormalize, eval_transform_size
from dinoforge.features import batch_features, frozen

matplotlib.use("Agg")


@dataclass
class PatchFeatures:
    """One image as the network saw it: `image` [H, W, 3] in [0, 1] and its normed patch tokens [h, w, D]."""

    image: np.ndarray
    tokens: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return self.tokens.shape[0], self.tokens.shape[1]


def prepare_image(img: Image.Image, size: int, patch_size: int) -> torch.Tensor:
    """Normalised [3, H, W] tensor: shorter side → size, both sides cropped to multiples of the patch."""
    return eval_transform_size(size, patch_size)(img.convert("RGB"))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


DEFAULT_SIZE = 224


def figure_size(img: Image.Image, size: int | None, patch_size: int) -> int:
    """The shorter side used for a figure: `size`, or by default the image's own shorter side capped at 224
    px (small images such as the 32 px bundled set are never upscaled), at least one patch."""
    if size is not None:
        return size
    return max(patch_size, min(DEFAULT_SIZE, min(img.size)))


def patch_features(model: torch.nn.Module, images: list[Image.Image], size: int | None = None) -> list[PatchFeatures]:
    """Normed patch tokens of each image (one forward per image, so aspect ratios may differ)."""
    p = int(model.patch_size)
    dev = model_device(model)
    out = []
    with frozen(model, dev, autocast=False):
        for img in images:
            x = prepare_image(img, figure_size(img, size, p), p)
            h, w = x.shape[1] // p, x.shape[2] // p
            tokens = batch_features(model, x[None].to(dev))["patch"][0].float().cpu()
            out.append(PatchFeatures(denormalize(x).permute(1, 2, 0).numpy(), tokens.reshape(h, w, -1).numpy()))
    return out


def pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by SVD of the centred data: (scores [N, k], components [k, D], explained variance [k]).

    Signs are fixed so that each component's largest-magnitude loading is positive (deterministic output)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:n_components]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    comps = comps * signs[:, None]
    var = s[:n_components] ** 2 / max(len(x) - 1, 1)
    return (x - mean) @ comps.T, comps, var

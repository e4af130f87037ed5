"""PCA of patch features → RGB, with the paper's foreground split on the first component (Fig. 1 / Fig. 9).

One PCA over the patches of all images together: its first component, thresholded, separates foreground
from background; a second 3-component PCA on the foreground patches gives the colours, so the same part
of different objects gets the same colour across images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoforge.utils import DinoforgeError, save_figure
from dinoforge.viz.common import PatchFeatures, patch_features, pca


def _border(h: int, w: int) -> np.ndarray:
    b = np.zeros((h, w), dtype=bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def foreground_masks(feats: list[PatchFeatures], threshold: float = 0.0) -> list[np.ndarray]:
    """Foreground [h, w] masks from the first principal component over all images' patches.

    The component is scaled to unit standard deviation and oriented so that border patches (mostly
    background in photos) score low; patches scoring above `threshold` are foreground."""
    tokens = np.concatenate([f.tokens.reshape(-1, f.tokens.shape[-1]) for f in feats])
    if len(tokens) < 2:
        raise DinoforgeError("PCA needs at least two patches; use a larger --size")
    score = pca(tokens, 1)[0][:, 0]
    score = score / (score.std() or 1.0)
    border = np.concatenate([_border(*f.grid).ravel() for f in feats])
    if not border.all() and score[border].mean() > score[~border].mean():
        score = -score
    masks, start = [], 0
    for f in feats:
        n = f.grid[0] * f.grid[1]
        masks.append((score[start : start + n] > threshold).reshape(f.grid))
        start += n
    return masks


def pca_rgb(feats: list[PatchFeatures], masks: list[np.ndarray] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """RGB [h, w, 3] maps in [0, 1] from a joint 3-component PCA of the (masked) patches, unmasked ones black.

    Each component is min-max scaled over the selected patches. Returns (maps, explained variance ratio)."""
    dim = feats[0].tokens.shape[-1]
    if masks is None or sum(int(m.sum()) for m in masks) < 3:
        masks = [np.ones(f.grid, dtype=bool) for f in feats]
    sel = np.concatenate([f.tokens[m] for f, m in zip(feats, masks, strict=True)])
    k = min(3, dim, len(sel))
    scores, _, var = pca(sel, k)
    total = np.var(sel.astype(np.float64), axis=0, ddof=1).sum()
    lo, hi = scores.min(0), scores.max(0)
    colours = np.zeros((len(sel), 3))
    colours[:, :k] = (scores - lo) / np.where(hi > lo, hi - lo, 1.0)
    maps, start = [], 0
    for f, m in zip(feats, masks, strict=True):
        rgb = np.zeros((*f.grid, 3))
        n = int(m.sum())
        rgb[m] = colours[start : start + n]
        maps.append(rgb)
        start += n
    return maps, var / total if total > 0 else var


@dataclass
class PCAResult:
    """What a PCA figure shows: the inputs as seen, foreground masks, colour maps, explained variance."""

    feats: list[PatchFeatures]
    masks: list[np.ndarray] | None
    rgb: list[np.ndarray]
    explained_variance_ratio: np.ndarray


def compute_pca(
    model: torch.nn.Module,
    images: list[Image.Image],
    size: int | None = None,
    foreground: bool = True,
    threshold: float = 0.0,
) -> PCAResult:
    """Patch features of the images, foreground split (optional) and the RGB PCA maps."""
    if not images:
        raise DinoforgeError("no images given")
    feats = patch_features(model, images, size)
    masks = foreground_masks(feats, threshold) if foreground else None
    rgb, ratio = pca_rgb(feats, masks)
    return PCAResult(feats, masks, rgb, ratio)


def draw_pca(result: PCAResult, out_png: str | Path, titles: list[str] | None = None, max_columns: int = 8) -> Path:
    """Grid PNG: one column per image (wrapped after `max_columns`); rows = image, foreground mask (when
    computed), PCA colours."""
    import matplotlib.pyplot as plt

    n = len(result.feats)
    cols = min(n, max_columns)
    per = 3 if result.masks is not None else 2
    labels = ["input"] + (["foreground (PC1)"] if result.masks is not None else []) + ["PCA of patches"]
    fig, axes = plt.subplots(per * math.ceil(n / cols), cols, figsize=(2.6 * cols, 2.6 * per * math.ceil(n / cols)))
    axes = np.asarray(axes).reshape(-1, cols)
    for ax in axes.ravel():
        ax.set_axis_off()
    for j, f in enumerate(result.feats):
        h, w = f.image.shape[:2]
        masks = [result.masks[j].astype(float)] if result.masks is not None else []
        for i, panel in enumerate([f.image, *masks, result.rgb[j]]):
            ax = axes[per * (j // cols) + i, j % cols]
            ax.set_axis_on()
            ax.imshow(panel, extent=(0, w, h, 0), interpolation="nearest", cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j % cols == 0:
                ax.set_ylabel(labels[i], fontsize=9)
        if titles:
            axes[per * (j // cols), j % cols].set_title(titles[j], fontsize=9)
    return save_figure(fig, out_png)


def pca_figure(
    model: torch.nn.Module,
    images: list[Image.Image],
    out_png: str | Path,
    size: int | None = None,
    foreground: bool = True,
    threshold: float = 0.0,
    titles: list[str] | None = None,
) -> Path:
    """Compute and draw the patch-PCA figure of `images` into `out_png`; returns the PNG path."""
    return draw_pca(compute_pca(model, images, size, foreground, threshold), out_png, titles)

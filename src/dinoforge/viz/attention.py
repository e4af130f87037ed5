"""Attention maps of the last block: how much the CLS token attends to each patch, per head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoforge.utils import DinoforgeError, save_figure
from dinoforge.viz.common import figure_size, model_device, prepare_image


@torch.inference_mode()
def cls_attention(model: torch.nn.Module, img: Image.Image, size: int | None = None, block: int = -1):
    """CLS→patch attention of one block for one image: (image [H, W, 3] in [0, 1], maps [heads, h, w]).

    Register tokens (if any) are skipped, so each map covers the patch grid only; rows sum to less than
    one by the attention given to CLS and registers."""
    from dinoforge.data.transforms import denormalize

    if not hasattr(model, "get_attention_maps"):
        raise DinoforgeError(f"{type(model).__name__} does not expose attention maps; use a dinoforge backbone")
    p = int(model.patch_size)
    x = prepare_image(img, figure_size(img, size, p), p)
    h, w = x.shape[1] // p, x.shape[2] // p
    attn = model.get_attention_maps(x[None].to(model_device(model)), [block])[0]
    first_patch = 1 + int(getattr(model, "num_register_tokens", 0))
    maps = attn[0, :, 0, first_patch:].float().cpu().reshape(-1, h, w).numpy()
    return denormalize(x).permute(1, 2, 0).numpy(), maps


def compute_attention(
    model: torch.nn.Module, images: list[Image.Image], size: int | None = None, block: int = -1
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`cls_attention` of each image."""
    if not images:
        raise DinoforgeError("no images given")
    return [cls_attention(model, img, size, block) for img in images]


def draw_attention(
    results: list[tuple[np.ndarray, np.ndarray]], out_png: str | Path, titles: list[str] | None = None
) -> Path:
    """Grid PNG: one row per image; columns = input, mean over heads, each head (each map min-max scaled)."""
    import matplotlib.pyplot as plt

    heads = results[0][1].shape[0]
    n = len(results)
    fig, axes = plt.subplots(n, heads + 2, figsize=(1.9 * (heads + 2), 1.9 * n), squeeze=False)
    for i, (image, maps) in enumerate(results):
        hh, ww = image.shape[:2]
        panels = [maps.mean(0), *maps]
        axes[i, 0].imshow(image)
        for j, m in enumerate(panels, start=1):
            span = m.max() - m.min()
            axes[i, j].imshow(
                (m - m.min()) / (span if span > 0 else 1.0),
                extent=(0, ww, hh, 0),
                cmap="inferno",
                vmin=0,
                vmax=1,
            )
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].set_title("mean", fontsize=8)
    for j in range(heads):
        axes[0, j + 2].set_title(f"head {j}", fontsize=8)
    return save_figure(fig, out_png)


def attention_figure(
    model: torch.nn.Module,
    images: list[Image.Image],
    out_png: str | Path,
    size: int | None = None,
    block: int = -1,
    titles: list[str] | None = None,
) -> Path:
    """Compute and draw the CLS→patch attention figure of `images` into `out_png`; returns the PNG path."""
    return draw_attention(compute_attention(model, images, size, block), out_png, titles)


def attention_entropy(maps: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each head's CLS→patch distribution after renormalising over patches."""
    p = maps.reshape(len(maps), -1).astype(np.float64)
    p = p / p.sum(1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)

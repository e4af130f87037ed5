"""Patch matching between two images: mutual nearest neighbours of patch features (cosine), lines drawn."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoforge.utils import save_figure
from dinoforge.viz.common import PatchFeatures, patch_features
from dinoforge.viz.pca import foreground_masks


def mutual_nearest_neighbors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j) where b[j] is a[i]'s nearest neighbour and a[i] is b[j]'s, by cosine similarity.

    Returns (indices into a, indices into b, cosine similarity), sorted by decreasing similarity."""
    ta = torch.nn.functional.normalize(torch.as_tensor(a, dtype=torch.float32), dim=1)
    tb = torch.nn.functional.normalize(torch.as_tensor(b, dtype=torch.float32), dim=1)
    sim = ta @ tb.T
    ab = sim.argmax(1)
    ba = sim.argmax(0)
    ia = torch.nonzero(ba[ab] == torch.arange(len(ta)), as_tuple=True)[0]
    ib = ab[ia]
    s = sim[ia, ib]
    order = torch.argsort(s, descending=True, stable=True)
    return ia[order].numpy(), ib[order].numpy(), s[order].numpy()


@dataclass
class Matches:
    """Mutual nearest-neighbour patch matches between two images, as patch centres in pixels."""

    feats: tuple[PatchFeatures, PatchFeatures]
    xy_a: np.ndarray
    xy_b: np.ndarray
    similarity: np.ndarray


def _centres(f: PatchFeatures, flat: np.ndarray) -> np.ndarray:
    h, w = f.grid
    ph, pw = f.image.shape[0] / h, f.image.shape[1] / w
    rows, cols = np.divmod(flat, w)
    return np.stack([(cols + 0.5) * pw, (rows + 0.5) * ph], axis=1)


def compute_matches(
    model: torch.nn.Module,
    img_a: Image.Image,
    img_b: Image.Image,
    size: int | None = None,
    foreground: bool = False,
) -> Matches:
    """Patch features of both images and their mutual nearest neighbours (foreground patches only when
    `foreground`, using the PCA first-component split of viz.pca)."""
    fa, fb = patch_features(model, [img_a, img_b], size)
    ta, tb = fa.tokens.reshape(-1, fa.tokens.shape[-1]), fb.tokens.reshape(-1, fb.tokens.shape[-1])
    keep_a, keep_b = np.arange(len(ta)), np.arange(len(tb))
    if foreground:
        ma, mb = foreground_masks([fa, fb])
        if ma.any() and mb.any():
            keep_a, keep_b = np.flatnonzero(ma), np.flatnonzero(mb)
    ia, ib, s = mutual_nearest_neighbors(ta[keep_a], tb[keep_b])
    return Matches((fa, fb), _centres(fa, keep_a[ia]), _centres(fb, keep_b[ib]), s)


def draw_matches(m: Matches, out_png: str | Path, max_lines: int = 80, titles: tuple[str, str] | None = None) -> Path:
    """Side-by-side PNG with a line per match (the `max_lines` most similar), coloured by position."""
    import matplotlib.pyplot as plt

    a, b = m.feats[0].image, m.feats[1].image
    gap = 10
    h = max(a.shape[0], b.shape[0])
    canvas = np.ones((h, a.shape[1] + gap + b.shape[1], 3))
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap :] = b
    width_in = max(8.0, canvas.shape[1] / 60)  # small inputs (e.g. 32 px) still give a readable figure
    fig, ax = plt.subplots(figsize=(width_in, width_in * canvas.shape[0] / canvas.shape[1]))
    ax.imshow(canvas)
    n = min(max_lines, len(m.similarity))
    colours = plt.cm.hsv(np.linspace(0, 1, n, endpoint=False))
    order = np.argsort(m.xy_a[:n, 1] * a.shape[1] + m.xy_a[:n, 0])  # hue follows position in image a
    for c, k in zip(colours, order, strict=True):
        (xa, ya), (xb, yb) = m.xy_a[k], m.xy_b[k]
        ax.plot([xa, xb + a.shape[1] + gap], [ya, yb], "-", color=c, linewidth=0.8)
        ax.plot([xa, xb + a.shape[1] + gap], [ya, yb], "o", color=c, markersize=2)
    title = f"{len(m.similarity)} mutual nearest-neighbour patch matches (showing {n})"
    if titles:
        title = f"{titles[0]} ↔ {titles[1]}: {title}"
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return save_figure(fig, out_png)


def match_figure(
    model: torch.nn.Module,
    img_a: Image.Image,
    img_b: Image.Image,
    out_png: str | Path,
    size: int | None = None,
    foreground: bool = False,
    max_lines: int = 80,
    titles: tuple[str, str] | None = None,
) -> Path:
    """Compute patch matches between two images and draw them into `out_png`; returns the PNG path."""
    return draw_matches(compute_matches(model, img_a, img_b, size, foreground), out_png, max_lines, titles)

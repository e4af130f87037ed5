"""The dense-probe machinery shared by the segmentation and depth probes (DINOv2 paper §7).

Data: ``root/images/<stem>.*`` paired with ``root/<label_dir>/<stem><ext>``. Frozen features: patch-token maps
of chosen blocks (optionally with each block's CLS token broadcast over the grid), extracted once with images
resized to a square side (a patch multiple) and held as float16, cached on disk given a backbone fingerprint.
Training: a head over the cached maps with AdamW and a warm-up/poly schedule. Output: a preview figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from dinoforge.data.datasets import is_image_file, load_image
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.eval.features import cache_root, feature_key
from dinoforge.features import batch_features, extract_features
from dinoforge.utils import DinoforgeError, atomic_torch_save, save_figure, track

IGNORE_INDEX = 255  # a class-id mask pixel that is not scored
PREVIEWS = 4  # val images drawn in predictions.png


def list_pairs(root: str | Path, label_dir: str, label_exts: Sequence[str]) -> list[tuple[Path, Path]]:
    """Pair ``root/images/<stem>.*`` with ``root/<label_dir>/<stem><ext>``; every image needs a label."""
    root = Path(root)
    img_dir, lab_dir = root / "images", root / label_dir
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DinoforgeError(f"expected folder {d} (layout: {root}/images/*.jpg|png and {lab_dir}/<stem>)")
    images = sorted(p for p in img_dir.iterdir() if is_image_file(p))
    if not images:
        raise DinoforgeError(f"no images in {img_dir}")
    pairs, missing = [], []
    for img in images:
        label = next(
            (lab_dir / f"{img.stem}{ext}" for ext in label_exts if (lab_dir / f"{img.stem}{ext}").exists()),
            None,
        )
        if label is None:
            missing.append(img.stem)
        else:
            pairs.append((img, label))
    if missing:
        raise DinoforgeError(
            f"{len(missing)} image(s) in {img_dir} have no {'/'.join(label_exts)} in {lab_dir}: "
            f"{', '.join(missing[:5])}"
        )
    return pairs


def image_tensor(path: Path, side: int | None = None) -> torch.Tensor:
    """Load an RGB image as a (3, H, W) ImageNet-normalised float tensor, resized to side x side if given."""
    im = load_image(path)
    if side is not None:
        im = im.resize((side, side), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def patch_side(size: int, patch_size: int) -> int:
    """The multiple of the patch size nearest to `size` (at least one patch)."""
    return max(patch_size, round(size / patch_size) * patch_size)


class _ImageFiles(Dataset):
    """Image files resized to side x side, as the `(tensor, label, index)` items of `extract_features`."""

    def __init__(self, paths: Sequence[Path], side: int) -> None:
        self.paths, self.side = paths, side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return image_tensor(self.paths[i], self.side), -1, i


def _maps(cls: torch.Tensor, patch: torch.Tensor, grid: tuple[int, int], with_cls: bool) -> torch.Tensor:
    """(B, C, h, w): each layer's patch-token grid, then (with `with_cls`) its class token broadcast over
    the grid, concatenated on channels; from per-layer class tokens [B, L, D] and patch tokens [B, L, h*w, D]."""
    b, n_layers, _, dim = patch.shape
    grids = patch.reshape(b, n_layers, *grid, dim).permute(0, 1, 4, 2, 3)
    maps = []
    for i in range(n_layers):
        maps.append(grids[:, i])
        if with_cls:
            maps.append(cls[:, i, :, None, None].expand_as(grids[:, i]))
    return torch.cat(maps, dim=1)


@torch.no_grad()
def dense_features(
    backbone: nn.Module,
    images: torch.Tensor,
    layers: int | Sequence[int],
    *,
    norm: bool = True,
    with_cls: bool = False,
) -> torch.Tensor:
    """Patch-token maps (B, C, h, w) of the chosen blocks of one batch, concatenated on channels.

    With `with_cls`, each layer's CLS token is broadcast over the grid and appended after its patch
    tokens (the paper's depth probes). `layers` is the last-n count or explicit block indices.
    """
    out = batch_features(backbone, images, layers, norm)
    grid = tuple(math.ceil(n / backbone.patch_size) for n in images.shape[-2:])  # a padded edge is a patch
    return _maps(out["cls"], out["patch"], grid, with_cls)


def extract_dense(
    backbone: nn.Module,
    paths: Sequence[Path],
    side: int,
    layers: int | Sequence[int],
    *,
    norm: bool = True,
    with_cls: bool = False,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    description: str = "features",
    fingerprint: str | None = None,
) -> torch.Tensor:
    """Dense frozen features of a list of images at side x side, as one float16 (N, C, h, w) CPU tensor.

    With a backbone `fingerprint` (eval.features.model_fingerprint) the result is cached on disk, keyed
    by the backbone, the image files (path, size, mtime) and the extraction settings."""
    cache_file = None
    if fingerprint is not None:
        files = [(str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in paths]
        layer_id = layers if isinstance(layers, int) else list(layers)
        settings = f"dense|side={side}|layers={layer_id}|norm={norm}|cls={with_cls}"
        cache_file = cache_root() / f"dense_{feature_key(fingerprint, repr(files), settings)}.pt"
        if cache_file.exists():
            return torch.load(cache_file, map_location="cpu", weights_only=True)
    out = extract_features(
        backbone,
        _ImageFiles(paths, side),
        batch_size,
        device,
        patch_tokens=True,
        desc=description,
        layers=layers,
        norm=norm,
        dtype=np.float16,
        autocast=False,
    )
    grid = math.ceil(side / backbone.patch_size)
    feats = _maps(torch.from_numpy(out["cls"]), torch.from_numpy(out["patch"]), (grid, grid), with_cls)
    if cache_file is not None:
        atomic_torch_save(feats, cache_file)
    return feats


def resize_nearest(label: torch.Tensor, side: int) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) label map to side x side (keeps ids and invalid values intact)."""
    return F.interpolate(label[None, None].double(), size=(side, side), mode="nearest")[0, 0].to(label.dtype)


def poly_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up then linear (poly, power 1) decay to zero, the official probes' schedule."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    return base_lr * max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))


def train_dense_head(
    head: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    device: torch.device | str,
    seed: int,
    description: str,
) -> nn.Module:
    """AdamW + warm-up/poly schedule over shuffled (feature, target) batches; shared by seg and depth probes.

    `loss_fn(head_output_at_target_size, target)` returns None when a batch has no valid pixel.
    """
    if len(features) != len(targets):
        raise DinoforgeError(f"{len(features)} feature maps but {len(targets)} targets")
    device = torch.device(device)
    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(max(1, total // 20), total)
    step = 0
    for _ in track(range(epochs), description, total=epochs):
        order = torch.randperm(len(features), generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            f, t = features[idx].to(device).float(), targets[idx].to(device)
            loss = loss_fn(head(f, size=tuple(t.shape[-2:])), t)
            for g in opt.param_groups:
                g["lr"] = poly_lr(step, total, lr, warmup)
            step += 1
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def save_previews(path: Path, rows: Sequence[tuple[Path, np.ndarray, np.ndarray]], num_classes: int = 0) -> Path:
    """PNG grid, one row per image: input | ground truth | prediction, as class colours (ignore = white)
    when `num_classes` is given, else as depth maps on a shared scale (invalid ground truth = white)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for ax_row, (img_path, gt, pred) in zip(axes, rows, strict=True):
        img = load_image(img_path).resize(gt.shape[::-1], Image.BILINEAR)
        ax_row[0].imshow(np.asarray(img))
        if num_classes:
            kw = dict(cmap="tab20", vmin=0, vmax=max(num_classes - 1, 1), interpolation="nearest")
            gt = np.ma.masked_equal(gt, IGNORE_INDEX)
        else:
            valid = gt[gt > 0]
            lo, hi = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
            kw = dict(cmap="magma_r", vmin=lo, vmax=hi)
            gt = np.ma.masked_less_equal(gt, 0)
        ax_row[1].imshow(gt, **kw)
        ax_row[2].imshow(pred, **kw)
        for ax, title in zip(ax_row, ("image", "ground truth", "prediction"), strict=True):
            ax.set_title(title)
            ax.axis("off")
    return save_figure(fig, path)

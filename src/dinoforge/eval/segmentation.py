"""Semantic segmentation linear probe on frozen patch tokens (DINOv2 paper §7, "lin." and "+ms").

Data layout (`--train-data` / `--val-data`): ``root/images/<stem>.jpg|jpeg|png|bmp|webp`` and
``root/masks/<stem>.png`` with the same stem; a mask pixel is the class id (0..K-1), 255 = ignore.

The head is the paper's: BatchNorm + 1x1 conv over the last layer's patch tokens (``layers=1``) or
the last four layers concatenated (``layers=4``); logits are bilinearly upsampled to the label size
and trained with cross-entropy that skips the ignore index. Frozen features are extracted once with
images resized to a square side (a patch multiple; aspect not kept, no train-time augmentation) and
held in RAM as float16, so training is a cheap pass over cached tensors; validation predictions are
upsampled back to each mask's own size. Multi-scale testing re-runs the backbone per scale (and flip).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dinoforge.eval.dense import (
    IGNORE_INDEX,
    PREVIEWS,
    dense_features,
    extract_dense,
    image_tensor,
    list_pairs,
    patch_side,
    resize_nearest,
    save_previews,
    train_dense_head,
)
from dinoforge.utils import DinoforgeError, atomic_torch_save, track, write_json


def load_mask(path: Path) -> torch.Tensor:
    """A (H, W) int64 class-id map from a single-channel (L or palette) PNG."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise DinoforgeError(f"mask {path} has mode {im.mode}: expected one channel of class ids (L or P)")
        return torch.from_numpy(np.asarray(im).astype(np.int64))


# --------------------------------------------------------------------------- probe on feature tensors


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv on a patch-feature map; logits upsampled bilinearly to the label size."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        logits = self.conv(self.dropout(self.bn(feats.float())))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


def train_seg_probe(
    features: torch.Tensor,
    masks: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LinearSegHead:
    """Train a LinearSegHead on frozen (N, C, h, w) features against (N, H, W) class-id masks."""
    torch.manual_seed(seed)
    head = LinearSegHead(features.shape[1], num_classes)

    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if not (target != ignore_index).any():
            return None
        return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)

    return train_dense_head(
        head,
        features,
        masks,
        ce,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        device=device,
        seed=seed,
        description="seg probe",
    )


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignored/out-of-range GT skipped."""
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx.cpu(), minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou_from_confusion(conf: torch.Tensor | np.ndarray) -> tuple[float, np.ndarray]:
    """Mean IoU and per-class IoU (NaN for classes absent from both prediction and ground truth)."""
    conf = np.asarray(conf, dtype=np.float64)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
    present = ~np.isnan(iou)
    return (float(iou[present].mean()) if present.any() else float("nan")), iou


def metrics_from_confusion(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """mIoU, per-class IoU (None where excluded), pixel and mean class accuracy as a JSON-ready dict."""
    miou, iou = miou_from_confusion(conf)
    c = conf.double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.diag(c) / c.sum(1)
    names = list(class_names) if class_names else [str(i) for i in range(len(iou))]
    return {
        "miou": miou,
        "pixel_acc": float(np.diag(c).sum() / max(c.sum(), 1.0)),
        "mean_acc": float(np.nanmean(acc)) if (c.sum(1) > 0).any() else float("nan"),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou, strict=True)},
        "num_pixels": int(c.sum()),
    }


@torch.no_grad()
def evaluate_seg(
    head: LinearSegHead,
    features: torch.Tensor,
    masks: torch.Tensor | Sequence[torch.Tensor],
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> dict:
    """Segment cached features at each mask's own size and score them (mIoU, per-class IoU, accuracy)."""
    head.to(device).eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    same_size = isinstance(masks, torch.Tensor)
    step = batch_size if same_size else 1
    for s in range(0, len(features), step):
        f = features[s : s + step].to(device)
        t = masks[s : s + step] if same_size else masks[s][None]
        pred = head(f, size=tuple(t.shape[-2:])).argmax(1).cpu()
        conf += confusion_matrix(pred, t, num_classes, ignore_index)
    return metrics_from_confusion(conf)


@torch.no_grad()
def predict_seg_multiscale(
    backbone: nn.Module,
    head: LinearSegHead,
    image: torch.Tensor,
    out_size: tuple[int, int],
    layers: int | Sequence[int],
    side: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Class probabilities (K, H, W) of one normalised (3, H0, W0) image, averaged over scales and flips."""
    patch = backbone.patch_size
    probs = None
    for scale in scales:
        s = patch_side(int(side * scale), patch)
        x = F.interpolate(image[None], size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        views = [(x, False)] + ([(x.flip(-1), True)] if flip else [])
        for v, flipped in views:
            p = head(dense_features(backbone, v, layers), size=out_size).softmax(1)
            p = p.flip(-1) if flipped else p
            probs = p if probs is None else probs + p
    return probs[0] / (len(scales) * (2 if flip else 1))


# --------------------------------------------------------------------------- end to end


def _max_id(mask: torch.Tensor) -> int:
    """Largest class id in a mask, ignoring 255 (-1 when it holds none)."""
    valid = mask[mask != IGNORE_INDEX]
    return int(valid.max()) if valid.numel() else -1


def seg_single_scale(
    head: LinearSegHead,
    features: torch.Tensor,
    masks: Sequence[torch.Tensor],
    num_classes: int,
    device: torch.device | str = "cpu",
) -> tuple[dict, list[torch.Tensor]]:
    """Score val features extracted at the training side: (metrics, the first PREVIEWS predicted class maps)."""
    metrics = evaluate_seg(head, features, masks, num_classes, device=device)
    with torch.no_grad():
        previews = [
            head(features[i : i + 1].to(device), size=tuple(masks[i].shape))[0].argmax(0).cpu()
            for i in range(min(PREVIEWS, len(features)))
        ]
    return metrics, previews


def seg_multi_scale(
    backbone: nn.Module,
    head: LinearSegHead,
    images: Sequence[Path],
    masks: Sequence[torch.Tensor],
    num_classes: int,
    side: int,
    layers: int,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[dict, list[torch.Tensor]]:
    """Score val images with class probabilities averaged over `scales` of the side (and flips), the
    paper's +ms: (metrics, the first PREVIEWS predicted class maps)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    previews = []
    for img, mask in track(list(zip(images, masks, strict=True)), "multi-scale test"):
        probs = predict_seg_multiscale(
            backbone, head, image_tensor(img).to(device), tuple(mask.shape), layers, side, scales, flip
        )
        pred = probs.argmax(0).cpu()
        conf += confusion_matrix(pred, mask, num_classes)
        if len(previews) < PREVIEWS:
            previews.append(pred)
    return metrics_from_confusion(conf), previews


def run_seg_eval(
    backbone: nn.Module,
    train_data: Path,
    val_data: Path,
    out: Path,
    *,
    num_classes: int | None = None,
    layers: int = 1,
    size: int = 448,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 16,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: torch.device | str = "cpu",
    fingerprint: str | None = None,
) -> dict:
    """Extract features (cached, given a backbone fingerprint), train the head on `train_data`, score
    `val_data`; write metrics.json, head.pt and predictions.png."""
    if layers < 1:
        raise DinoforgeError(f"--layers must be >= 1, got {layers}")
    backbone = backbone.to(device).eval()
    side = patch_side(size, backbone.patch_size)
    train_pairs = list_pairs(train_data, "masks", (".png",))
    val_pairs = list_pairs(val_data, "masks", (".png",))
    train_masks = [load_mask(m) for _, m in track(train_pairs, "train masks")]
    if num_classes is None:
        num_classes = max(_max_id(m) for m in train_masks) + 1
        if num_classes < 1:
            raise DinoforgeError("train masks hold no class ids other than 255 (ignore)")
    train_feats = extract_dense(
        backbone,
        [p for p, _ in train_pairs],
        side,
        layers,
        batch_size=batch_size,
        device=device,
        description="train features",
        fingerprint=fingerprint,
    )
    grid = train_feats.shape[-1]
    target = torch.stack([resize_nearest(m, grid * backbone.patch_size) for m in train_masks])
    head = train_seg_probe(train_feats, target, num_classes, epochs=epochs, lr=lr, batch_size=batch_size, device=device)
    val_masks = [load_mask(m) for _, m in val_pairs]
    too_high = [p.name for (_, p), m in zip(val_pairs, val_masks, strict=True) if _max_id(m) >= num_classes]
    if too_high:
        raise DinoforgeError(
            f"val masks hold class ids >= {num_classes} (e.g. {too_high[0]}); set --num-classes to cover them"
        )
    val_images = [p for p, _ in val_pairs]
    if list(scales) == [1.0] and not flip:
        val_feats = extract_dense(
            backbone,
            val_images,
            side,
            layers,
            batch_size=batch_size,
            device=device,
            description="val features",
            fingerprint=fingerprint,
        )
        metrics, previews = seg_single_scale(head, val_feats, val_masks, num_classes, device)
    else:
        metrics, previews = seg_multi_scale(
            backbone, head, val_images, val_masks, num_classes, side, layers, scales, flip, device
        )
    rows = [(p, m.numpy(), pr.numpy()) for (p, _), m, pr in zip(val_pairs, val_masks, previews, strict=False)]
    save_previews(out / "predictions.png", rows, num_classes=num_classes)
    result = {
        "task": "segmentation",
        "layers": layers,
        "side": side,
        "num_classes": num_classes,
        "scales": list(scales),
        "flip": flip,
        "epochs": epochs,
        "lr": lr,
        "num_train": len(train_pairs),
        "num_val": len(val_pairs),
        **metrics,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    atomic_torch_save(
        {"state_dict": head.state_dict(), "num_classes": num_classes, "layers": layers, "side": side},
        out / "head.pt",
    )
    return result

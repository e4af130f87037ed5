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

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from torch import nn

from dinoforge.cli_common import BatchOpt, DeviceOpt, ModelOpt, OutOpt, WeightsOpt, load_model_from_opts
from dinoforge.data.datasets import is_image_file, load_image
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.eval.features import CacheOpt, cache_root, feature_key, model_fingerprint
from dinoforge.utils import DinoforgeError, atomic_torch_save, resolve_device, track, write_json

IGNORE_INDEX = 255
PREVIEWS = 4  # val images drawn in predictions.png


# --------------------------------------------------------------------------- data (shared with depth.py)


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


@torch.no_grad()
def dense_features(
    backbone: nn.Module,
    images: torch.Tensor,
    layers: int | Sequence[int],
    *,
    norm: bool = True,
    with_cls: bool = False,
) -> torch.Tensor:
    """Patch-token maps (B, C, h, w) of the chosen blocks, concatenated on channels.

    With `with_cls`, each layer's CLS token is broadcast over the grid and appended after its patch
    tokens (the paper's depth probes). `layers` is the last-n count or explicit block indices.
    """
    outs = backbone.get_intermediate_layers(images, n=layers, reshape=True, return_class_token=True, norm=norm)
    maps = []
    for patches, cls in outs:
        maps.append(patches)
        if with_cls:
            maps.append(cls[:, :, None, None].expand_as(patches))
    return torch.cat(maps, dim=1)


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
    chunks = []
    starts = range(0, len(paths), batch_size)
    for s in track(starts, description, total=len(starts)):
        batch = torch.stack([image_tensor(p, side) for p in paths[s : s + batch_size]]).to(device)
        chunks.append(dense_features(backbone, batch, layers, norm=norm, with_cls=with_cls).half().cpu())
    feats = torch.cat(chunks)
    if cache_file is not None:
        atomic_torch_save(feats, cache_file)
    return feats


def load_mask(path: Path) -> torch.Tensor:
    """A (H, W) int64 class-id map from a single-channel (L or palette) PNG."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise DinoforgeError(f"mask {path} has mode {im.mode}: expected one channel of class ids (L or P)")
        return torch.from_numpy(np.asarray(im).astype(np.int64))


def resize_nearest(label: torch.Tensor, side: int) -> torch.Tensor:
    """Nearest-neighbour resize of a (H, W) label map to side x side (keeps ids and invalid values intact)."""
    return F.interpolate(label[None, None].double(), size=(side, side), mode="nearest")[0, 0].to(label.dtype)


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


def save_previews(path: Path, rows: Sequence[tuple[Path, np.ndarray, np.ndarray]], num_classes: int = 0) -> Path:
    """PNG grid, one row per image: input | ground truth | prediction, as class colours (ignore = white)
    when `num_classes` is given, else as depth maps on a shared scale (invalid ground truth = white)."""
    import matplotlib.pyplot as plt

    from dinoforge.viz.common import save_figure

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


def _max_id(mask: torch.Tensor) -> int:
    """Largest class id in a mask, ignoring 255 (-1 when it holds none)."""
    valid = mask[mask != IGNORE_INDEX]
    return int(valid.max()) if valid.numel() else -1


def _parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DinoforgeError(f"--ms-scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise DinoforgeError(f"--ms-scales must be positive numbers, got {text!r}")
    return scales


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
    if list(scales) == [1.0] and not flip:
        val_feats = extract_dense(
            backbone,
            [p for p, _ in val_pairs],
            side,
            layers,
            batch_size=batch_size,
            device=device,
            description="val features",
            fingerprint=fingerprint,
        )
        metrics = evaluate_seg(head, val_feats, val_masks, num_classes, device=device)
        with torch.no_grad():
            previews = [
                head(val_feats[i : i + 1].to(device), size=tuple(val_masks[i].shape))[0].argmax(0).cpu()
                for i in range(min(PREVIEWS, len(val_pairs)))
            ]
    else:
        conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        previews = []
        for (img, _), mask in track(list(zip(val_pairs, val_masks, strict=True)), "multi-scale test"):
            probs = predict_seg_multiscale(
                backbone, head, image_tensor(img).to(device), tuple(mask.shape), layers, side, scales, flip
            )
            pred = probs.argmax(0).cpu()
            conf += confusion_matrix(pred, mask, num_classes)
            if len(previews) < PREVIEWS:
                previews.append(pred)
        metrics = metrics_from_confusion(conf)
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


def seg_command(
    train_data: Annotated[Path, typer.Option("--train-data", help="Folder with images/ and masks/ (same stems).")],
    val_data: Annotated[Path, typer.Option("--val-data", help="Validation folder, same layout as --train-data.")],
    out: OutOpt = Path("runs/eval_seg"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", min=1, help="Classes (default: 1 + largest id in train masks)."),
    ] = None,
    layers: Annotated[int, typer.Option("--layers", min=1, help="1 = last block (lin.), 4 = last four (+ms).")] = 1,
    size: Annotated[int, typer.Option("--size", min=1, help="Square side the images are resized to.")] = 448,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the cached train features.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate.")] = 1e-3,
    ms_scales: Annotated[
        str,
        typer.Option("--ms-scales", help="Test scales, e.g. 1.0,1.32,1.73,2.28,3.0 (paper's +ms); averaged."),
    ] = "1.0",
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Also average horizontally flipped test views.")
    ] = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Semantic segmentation linear probe: BN + 1x1 conv on frozen patch tokens, mIoU and per-class IoU.

    Layout: DIR/images/<stem>.jpg|png and DIR/masks/<stem>.png (pixel = class id, 255 = ignore).
    Writes metrics.json, head.pt and predictions.png (a few val images) into --out.
    """
    dev = resolve_device(device)
    backbone = load_model_from_opts(model, weights, str(dev))
    fingerprint = model_fingerprint(backbone, weights if weights is not None else model) if cache else None
    result = run_seg_eval(
        backbone,
        train_data,
        val_data,
        out,
        num_classes=num_classes,
        layers=layers,
        size=size,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        scales=_parse_scales(ms_scales),
        flip=flip,
        device=dev,
        fingerprint=fingerprint,
    )
    print(f"mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['pixel_acc']:.2f}")
    print(f"results in {out}")

"""Monocular depth linear probe (DINOv2 paper §7: lin.1 / lin.4) with RMSE, AbsRel and delta metrics.

Data layout (`--train-data` / `--val-data`): ``root/images/<stem>.jpg|png`` and ``root/depth/<stem>.png``
(16-bit PNG, millimetres) or ``root/depth/<stem>.npy`` (float, metres); depth 0 = invalid pixel.

The head follows the official linear depther: the patch tokens of the last block (lin.1) or of four
evenly spread blocks (lin.4, e.g. blocks 2, 5, 8, 11 of a 12-block ViT), each concatenated with its
CLS token, taken before the final norm, bilinearly upsampled x4, then a 1x1 conv to 256 depth bins
spread linearly over [min_depth, max_depth]. Bin scores are made a distribution (ReLU + 0.1,
normalised: the official "linear" strategy, or softmax) and the depth is the expected bin centre.
It is trained with the scale-invariant log loss (SigLoss) on valid pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinoforge.eval.dense import (
    PREVIEWS,
    extract_dense,
    list_pairs,
    patch_side,
    resize_nearest,
    save_previews,
    train_dense_head,
)
from dinoforge.utils import DinoforgeError, atomic_torch_save, track, write_json

DEPTH_EXTS = (".png", ".npy")
METRIC_NAMES = ("rmse", "abs_rel", "sq_rel", "rmse_log", "log10", "delta1", "delta2", "delta3")
_OFFICIAL_LIN4 = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}


def depth_layer_indices(num_blocks: int, layers: int) -> list[int]:
    """Blocks the paper's lin.1 (last) and lin.4 (four spread out, the official choice) probes read."""
    if layers == 1:
        return [num_blocks - 1]
    if layers == 4:
        if num_blocks < 4:
            raise DinoforgeError(f"lin.4 needs a backbone with at least 4 blocks, this one has {num_blocks}")
        return _OFFICIAL_LIN4.get(num_blocks, [(i + 1) * num_blocks // 4 - 1 for i in range(4)])
    raise DinoforgeError(f"--layers must be 1 (lin.1) or 4 (lin.4), got {layers}")


def load_depth(path: Path) -> torch.Tensor:
    """A (H, W) float32 depth map in metres: 16-bit PNG in millimetres or .npy in metres (0 = invalid)."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path).astype(np.float32)
    else:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I", "L"):
                raise DinoforgeError(f"depth {path} has mode {im.mode}: expected a 16-bit PNG in millimetres")
            arr = np.asarray(im).astype(np.float32) / 1000.0
    if arr.ndim != 2:
        raise DinoforgeError(f"depth {path} has shape {arr.shape}: expected (H, W)")
    return torch.from_numpy(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0))


class LinearDepthHead(nn.Module):
    """Upsample x`upsample`, 1x1 conv to `n_bins` depth bins, depth = expected bin centre (AdaBins style)."""

    def __init__(
        self,
        in_dim: int,
        n_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        upsample: int = 4,
        norm_strategy: str = "linear",
    ) -> None:
        super().__init__()
        if norm_strategy not in ("linear", "softmax"):
            raise DinoforgeError(f"norm_strategy must be linear or softmax, got {norm_strategy!r}")
        if not 0 < min_depth < max_depth:
            raise DinoforgeError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.upsample, self.norm_strategy = upsample, norm_strategy
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv = nn.Conv2d(in_dim, n_bins, kernel_size=1)
        self.register_buffer("bins", torch.linspace(min_depth, max_depth, n_bins), persistent=False)

    def bin_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, n_bins, h*up, w*up) distribution over depth bins."""
        x = feats.float()
        if self.upsample != 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        logits = self.conv(x)
        if self.norm_strategy == "softmax":
            return logits.softmax(1)
        p = logits.relu() + 0.1
        return p / p.sum(1, keepdim=True)

    def forward(self, feats: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        depth = torch.einsum("bkhw,k->bhw", self.bin_probs(feats), self.bins)[:, None]
        if size is not None and tuple(depth.shape[-2:]) != tuple(size):
            depth = F.interpolate(depth, size=size, mode="bilinear", align_corners=False)
        return depth[:, 0]


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, lam: float = 0.15, eps: float = 1e-3) -> torch.Tensor | None:
    """Scale-invariant log loss sqrt(Var(g) + lam * mean(g)^2), g = log pred - log gt over gt > 0 pixels."""
    valid = gt > 0
    if valid.sum() < 2:
        return None
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    return torch.sqrt(g.var() + lam * g.mean() ** 2)


def train_depth_probe(
    features: torch.Tensor,
    depths: torch.Tensor,
    *,
    n_bins: int = 256,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    upsample: int = 4,
    norm_strategy: str = "linear",
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LinearDepthHead:
    """Train a LinearDepthHead on frozen (N, C, h, w) features against (N, H, W) depth maps in metres."""
    torch.manual_seed(seed)
    head = LinearDepthHead(features.shape[1], n_bins, min_depth, max_depth, upsample, norm_strategy)
    return train_dense_head(
        head, features, depths, sig_loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
        batch_size=batch_size, device=device, seed=seed, description="depth probe",
    )  # fmt: skip


def depth_errors(pred: torch.Tensor, gt: torch.Tensor) -> dict[str, float] | None:
    """Standard depth metrics of one image over its valid pixels (gt > 0); None if it has none."""
    valid = gt > 0
    if not valid.any():
        return None
    p, g = pred[valid].double(), gt[valid].double()
    ratio = torch.maximum(p / g, g / p)
    return {
        "rmse": float(torch.sqrt(((p - g) ** 2).mean())),
        "abs_rel": float(((p - g).abs() / g).mean()),
        "sq_rel": float(((p - g) ** 2 / g).mean()),
        "rmse_log": float(torch.sqrt(((p.log() - g.log()) ** 2).mean())),
        "log10": float((p.log10() - g.log10()).abs().mean()),
        "delta1": float((ratio < 1.25).double().mean()),
        "delta2": float((ratio < 1.25**2).double().mean()),
        "delta3": float((ratio < 1.25**3).double().mean()),
    }


@torch.no_grad()
def evaluate_depth(
    head: LinearDepthHead,
    features: torch.Tensor,
    depths: torch.Tensor | Sequence[torch.Tensor],
    *,
    max_eval_depth: float | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Predict each image at its ground truth's size and average the per-image metrics (NYU/KITTI protocol).

    Predictions are clamped to the head's depth range; ground truth beyond `max_eval_depth` is invalid.
    """
    head.to(device).eval()
    sums = dict.fromkeys(METRIC_NAMES, 0.0)
    count = 0
    for i in range(len(features)):
        gt = depths[i].float()
        if max_eval_depth is not None:
            gt = torch.where(gt <= max_eval_depth, gt, torch.zeros_like(gt))
        pred = head(features[i : i + 1].to(device), size=tuple(gt.shape))[0].cpu()
        errs = depth_errors(pred.clamp(head.min_depth, head.max_depth), gt)
        if errs is None:
            continue
        count += 1
        for k, v in errs.items():
            sums[k] += v
    if count == 0:
        raise DinoforgeError("no validation image has a valid depth pixel (depth > 0)")
    return {**{k: v / count for k, v in sums.items()}, "num_images": count}


def run_depth_eval(
    backbone: nn.Module,
    train_data: Path,
    val_data: Path,
    out: Path,
    *,
    layers: int = 1,
    size: int = 448,
    n_bins: int = 256,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    norm_strategy: str = "linear",
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    fingerprint: str | None = None,
) -> dict:
    """Extract lin.1/lin.4 features (cached, given a backbone fingerprint), train the head, score the
    val set; write metrics.json, head.pt and predictions.png."""
    backbone = backbone.to(device).eval()
    num_blocks = getattr(backbone, "n_blocks", None) or len(backbone.blocks)
    blocks = depth_layer_indices(num_blocks, layers)
    side = patch_side(size, backbone.patch_size)
    train_pairs = list_pairs(train_data, "depth", DEPTH_EXTS)
    val_pairs = list_pairs(val_data, "depth", DEPTH_EXTS)

    def feats(pairs: list[tuple[Path, Path]], what: str) -> torch.Tensor:
        paths = [p for p, _ in pairs]
        return extract_dense(backbone, paths, side, blocks, norm=False, with_cls=True, batch_size=batch_size,
                             device=device, description=what, fingerprint=fingerprint)  # fmt: skip

    train_feats = feats(train_pairs, "train features")
    target = torch.stack([resize_nearest(load_depth(d), side) for _, d in track(train_pairs, "train depth")])
    head = train_depth_probe(train_feats, target, n_bins=n_bins, min_depth=min_depth, max_depth=max_depth,
                             norm_strategy=norm_strategy, epochs=epochs, lr=lr, batch_size=batch_size,
                             device=device)  # fmt: skip
    val_depths = [load_depth(d) for _, d in val_pairs]
    val_feats = feats(val_pairs, "val features")
    metrics = evaluate_depth(head, val_feats, val_depths, max_eval_depth=max_depth, device=device)
    with torch.no_grad():
        rows = [
            (img, gt.numpy(), head(val_feats[i : i + 1].to(device), size=tuple(gt.shape))[0].cpu().numpy())
            for i, ((img, _), gt) in enumerate(zip(val_pairs[:PREVIEWS], val_depths, strict=False))
        ]
    save_previews(out / "predictions.png", rows)
    result = {
        "task": "depth", "layers": layers, "blocks": blocks, "side": side, "n_bins": n_bins,
        "min_depth": min_depth, "max_depth": max_depth, "norm_strategy": norm_strategy, "epochs": epochs,
        "lr": lr, "num_train": len(train_pairs), "num_val": len(val_pairs), **metrics,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    atomic_torch_save({"state_dict": head.state_dict(), **{k: result[k] for k in
                       ("layers", "blocks", "side", "n_bins", "min_depth", "max_depth", "norm_strategy")}},
                      out / "head.pt")  # fmt: skip
    return result

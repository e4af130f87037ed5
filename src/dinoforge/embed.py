"""Feature extraction: `extract_features` (used by eval, curate and viz) and the `dinoforge embed` command."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch.utils.data import DataLoader, Dataset

from dinoforge.cli_common import BatchOpt, DeviceOpt, ModelOpt, OutOpt, WeightsOpt, load_model_from_opts
from dinoforge.utils import DinoforgeError, resolve_device, track, write_json


def _collate_by_shape(batch: list) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Drop None (corrupt) samples and stack the rest in groups of equal image shape, so aspect-keeping
    transforms can be batched without padding every image to the largest one."""
    groups: dict[tuple[int, ...], list] = {}
    for sample in batch:
        if sample is None:
            continue
        img = sample[0]
        if not isinstance(img, torch.Tensor):
            raise DinoforgeError("extract_features needs a dataset with a transform that returns tensors")
        groups.setdefault(tuple(img.shape), []).append(sample)
    return [
        (
            torch.stack([s[0] for s in group]),
            torch.tensor([s[1] for s in group], dtype=torch.int64),
            torch.tensor([s[2] for s in group], dtype=torch.int64),
        )
        for group in groups.values()
    ]


def _autocast(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def frozen(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """`model` on `device` in eval mode, under inference mode (and autocast on CUDA); its mode restored after."""
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), _autocast(device):
            yield
    finally:
        model.train(was_training)


def image_batches(
    dataset: Dataset, batch_size: int, desc: str, num_workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, dataset indices) over a dataset of `(tensor, label, index)` items in order, with a
    progress bar; corrupt items (None) dropped, images of different shapes in separate groups."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_by_shape,
        pin_memory=pin_memory,
    )
    for groups in track(loader, desc, total=math.ceil(len(dataset) / batch_size)):
        yield from groups


def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    patch_tokens: bool = False,
    num_workers: int = 0,
    desc: str = "embedding",
) -> dict[str, Any]:
    """Run a backbone over a dataset of `(tensor, label, index)` items (None = corrupt, skipped).

    Returns "cls" float32 [N, D], "patch" float32 [N, n_patches, D] when asked, "labels" and "indices"
    (dataset indices kept, in order), "skipped" (indices of corrupt items) and "skipped_names"."""
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    n = len(dataset)
    cls = patch = None
    labels = np.empty(n, dtype=np.int64)
    indices = np.empty(n, dtype=np.int64)
    k = 0
    with frozen(model, dev):
        for x, y, idx in image_batches(dataset, batch_size, desc, num_workers, pin_memory=dev.type == "cuda"):
            out = model.forward_features(x.to(dev, non_blocking=True))
            c = out["x_norm_clstoken"].float().cpu().numpy()
            if cls is None:
                cls = np.empty((n, c.shape[1]), dtype=np.float32)
            cls[k : k + len(c)] = c
            if patch_tokens:
                p = out["x_norm_patchtokens"].float().cpu().numpy()
                if patch is None:
                    patch = np.empty((n, *p.shape[1:]), dtype=np.float32)
                elif p.shape[1:] != patch.shape[1:]:
                    raise DinoforgeError(
                        f"patch tokens need equal token grids, got {p.shape[1]} and {patch.shape[1]} "
                        "patches; use a fixed-size transform (centre crop)"
                    )
                patch[k : k + len(p)] = p
            labels[k : k + len(c)] = y.numpy()
            indices[k : k + len(c)] = idx.numpy()
            k += len(c)
    if cls is None:
        raise DinoforgeError(f"no readable image among the {n} items of the dataset")
    order = np.argsort(indices[:k], kind="stable")
    skipped = np.setdiff1d(np.arange(n), indices[:k])
    name = getattr(dataset, "item_name", str)
    result: dict[str, Any] = {
        "cls": cls[:k][order],
        "labels": labels[:k][order],
        "indices": indices[:k][order],
        "skipped": skipped,
        "skipped_names": [name(int(i)) for i in skipped],
    }
    if patch_tokens:
        result["patch"] = patch[:k][order]
    return result


def _transform_for(data: str, size: int | None, patch_size: int):
    """The eval transform of `dinoforge embed`: bundled images at their native size (rounded up to the patch),
    otherwise the official resize 256 / crop 224, or an aspect-keeping `--size`."""
    from dinoforge.data.transforms import eval_transform, eval_transform_size, normalize_transform

    if data.split(":")[0] in ("bundled", "bundled-full") and not Path(data).exists():
        return normalize_transform(), math.ceil((size or 32) / patch_size) * patch_size
    if size is None:
        return eval_transform(), None
    return eval_transform_size(size, patch_size), None


def embed_command(
    data: Annotated[
        str,
        typer.Option("--data", "-d", help="Image folder (recursive), .txt/.csv/.jsonl list, or bundled[:train|:val]."),
    ],
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    patch_tokens: Annotated[
        bool, typer.Option("--patch-tokens", help="Also save the normalised patch tokens [N, n_patches, D].")
    ] = False,
    size: Annotated[
        int | None,
        typer.Option(
            "--size",
            min=1,
            help="Shorter side in px, aspect kept, cropped to a multiple of the patch size. "
            "Default: resize 256 / centre crop 224 (the official eval transform).",
        ),
    ] = None,
    batch_size: BatchOpt = 64,
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="Data-loading processes.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Embed images with a backbone: writes features.npy (CLS), patch_tokens.npy (--patch-tokens), labels.npy,
    files.txt (embedded items in row order), skipped.txt (corrupt/non-image files) and meta.json."""
    from dinoforge.data.datasets import build_dataset, report_skipped

    net = load_model_from_opts(model, weights, device)
    patch_size = int(getattr(net, "patch_size", 14))
    transform, bundled_size = _transform_for(data, size, patch_size)
    dataset = build_dataset(data, transform=transform, size=bundled_size or 32)
    if len(dataset) == 0:
        raise DinoforgeError(f"no images found in {data}")
    dev = next(net.parameters()).device
    t0 = time.perf_counter()
    feats = extract_features(net, dataset, batch_size, dev, patch_tokens=patch_tokens, num_workers=num_workers)
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", feats["cls"])
    np.save(out / "labels.npy", feats["labels"])
    if patch_tokens:
        np.save(out / "patch_tokens.npy", feats["patch"])
    name = getattr(dataset, "item_name", str)
    (out / "files.txt").write_text("".join(f"{name(int(i))}\n" for i in feats["indices"]))
    ignored = [str(p) for p in getattr(dataset, "ignored", [])]
    skipped = feats["skipped_names"] + ignored
    (out / "skipped.txt").write_text("".join(f"{s}\n" for s in skipped))
    write_json(
        out / "meta.json",
        {
            "model": model,
            "weights": str(weights) if weights else None,
            "data": data,
            "transform": repr(transform),
            "num_images": int(len(feats["cls"])),
            "dim": int(feats["cls"].shape[1]),
            "patch_tokens_shape": list(feats["patch"].shape) if patch_tokens else None,
            "num_corrupt": len(feats["skipped_names"]),
            "num_non_image_files": len(ignored),
            "classes": list(getattr(dataset, "classes", [])),
            "device": str(dev),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(feats["cls"]) / max(seconds, 1e-9), 2),
        },
    )
    typer.echo(f"embedded {len(feats['cls'])} images, skipped {len(skipped)} -> {out}")
    report_skipped(feats["skipped_names"])

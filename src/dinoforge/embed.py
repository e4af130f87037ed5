"""The `dinoforge embed` command: features of an image set written as .npy files."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from dinoforge.cli_common import BatchOpt, DeviceOpt, ModelOpt, OutOpt, WeightsOpt, load_model_from_opts
from dinoforge.eval.features import extract_features
from dinoforge.utils import DinoforgeError, write_json


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
    from dinoforge.data.datasets import build_dataset

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

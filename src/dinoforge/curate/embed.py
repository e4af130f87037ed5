"""Embed an image set into float16 shards (`shard_XXXXX.npy` + `.json` file list), sharded over torchrun ranks
and resumable: a shard whose `.json` exists is finished and is skipped on a re-run, provided it records the
same embedder (model, weights file, image size, descriptor) and the same images; otherwise the re-run fails
instead of mixing embeddings of two models in one folder."""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dinoforge import distributed
from dinoforge.curate.store import absolute_name, describe_identity, read_shard_meta
from dinoforge.utils import DinoforgeError, eprint, files_under, write_json

PIXEL_IMAGE_SIZE = 64  # the pixel descriptor's input: images resized to 64x64
BACKBONE_RESIZE, BACKBONE_CROP = 256, 224  # a backbone's eval transform: shorter side 256, centre crop 224


class ThumbnailDescriptor(nn.Module):
    """Copy-detection descriptor with no weights: each colour channel pooled to size×size, centred and
    L2-normalised per channel, then concatenated and normalised.

    Per-channel centring/normalising makes the cosine invariant to per-channel gain and offset (colour shifts,
    brightness, contrast, the ImageNet normalisation itself); pooling makes it stable under resizes, JPEG and
    small crops. A randomly initialised ViT has none of these invariances. `forward_features` mirrors a
    backbone's so `extract_features` runs it unchanged."""

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.adaptive_avg_pool2d(x.float(), self.size).flatten(2)
        g = F.normalize(g - g.mean(dim=2, keepdim=True), dim=2)
        return F.normalize(g.flatten(1), dim=1)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Backbone-style output: the descriptor as `x_norm_clstoken`."""
        return {"x_norm_clstoken": self(x)}


class _Slice(Dataset):
    """Rows [start, stop) of a dataset, re-indexed from 0 (what extract_features expects)."""

    def __init__(self, base: Dataset, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        item = self.base[self.start + i]
        return None if item is None else (item[0], item[1], i)

    def item_name(self, i: int) -> str:
        return absolute_name(str(getattr(self.base, "item_name", str)(self.start + i)))


def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    shard_size: int = 10000,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed this rank's shards (shard s goes to rank s mod world) into out_dir; finished shards are skipped.

    Each shard is written as float16 `.npy` (then read memory-mapped) plus a `.json` with the embedded
    paths (absolute) in row order, the unreadable ones and `identity` (what produced the vectors; see
    `embedder_identity`, default: the module's class); the `.json` is written last, so a crash never leaves
    a shard that looks done. A finished shard is reused only when it records the same identity and the same
    images, else DinoforgeError. Returns counts for this rank."""
    from dinoforge.features import extract_features

    n = len(dataset)
    if n == 0:
        raise DinoforgeError("nothing to embed: the image set is empty")
    r, w = distributed.rank_world_or_env()
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if identity is None:
        identity = {"module": type(model).__qualname__}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    stats = {"images": n, "shards": n_shards, "embedded": 0, "skipped": 0, "resumed_shards": 0}
    for s in range(rank, n_shards, world_size):
        meta_path = out / f"shard_{s:05d}.json"
        part = _Slice(dataset, s * shard_size, min(n, (s + 1) * shard_size))
        if meta_path.exists():
            _check_resumable(meta_path, part, identity)
            stats["resumed_shards"] += 1
            continue
        try:
            feats = extract_features(model, part, batch_size, device, desc=f"embedding shard {s}")
            vecs, names, skipped = (
                feats["cls"],
                [part.item_name(int(i)) for i in feats["indices"]],
                feats["skipped_names"],
            )
        except DinoforgeError as e:
            if "no readable image" not in str(e):
                raise
            vecs, names, skipped = (
                np.zeros((0, 0), np.float32),
                [],
                [part.item_name(i) for i in range(len(part))],
            )
        tmp = out / f".shard_{s:05d}.tmp.npy"
        np.save(tmp, vecs.astype(np.float16))
        os.replace(tmp, out / f"shard_{s:05d}.npy")
        write_json(
            meta_path,
            {"shard": s, "start": s * shard_size, "embedder": identity, "paths": names, "skipped": skipped},
        )
        stats["embedded"] += len(names)
        stats["skipped"] += len(skipped)
        if skipped:
            eprint(f"shard {s}: skipped {len(skipped)} unreadable image(s)")
    distributed.barrier()
    return stats


def _check_resumable(meta_path: Path, part: _Slice, identity: dict[str, Any]) -> None:
    """A finished shard may be reused only if the same embedder produced it from the same images."""
    meta = read_shard_meta(meta_path)
    done = meta["paths"] + meta["skipped"]
    folder = meta_path.parent
    if meta.get("embedder") != identity:
        raise DinoforgeError(
            f"{folder} holds embeddings from another model ({describe_identity(meta.get('embedder'))}) than "
            f"this run ({describe_identity(identity)}): choose a new output folder, or delete its shard_* files "
            "to re-embed"
        )
    if sorted(done) != sorted(part.item_name(i) for i in range(len(part))):
        raise DinoforgeError(
            f"{folder} holds shard {meta_path.stem} of another image set or shard size (its images differ from "
            "this run's): choose a new output folder, or delete its shard_* files to re-embed"
        )


def _fingerprint(path: str | Path) -> str:
    """An absolute path with its size and modification time (a folder: total size, newest file), so that a
    changed weights file at the same path is told apart."""
    p = Path(path).absolute()
    stats = [f.stat() for f in files_under(p)]
    size = sum(st.st_size for st in stats)
    mtime = max((st.st_mtime for st in stats), default=0.0)
    when = datetime.fromtimestamp(int(mtime), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{p} ({size} bytes, modified {when})"


def embedder_identity(
    model: str | None, weights: str | Path | None = None, random_init: bool = False
) -> dict[str, Any]:
    """What produced a curation embedding, recorded in every shard: the model name (or its file with size
    and modification time), the weights file likewise (for a hub name, the cached released file it loads, or the
    random init), the input image size and the descriptor."""
    if model in ("pixel", "thumbnail"):
        grid = ThumbnailDescriptor().size
        return {
            "model": "pixel",
            "descriptor": f"thumbnail {grid}x{grid} per channel",
            "image_size": PIXEL_IMAGE_SIZE,
        }
    from dinoforge.models.hub import TORCH_HUB_FILES, find_hub_weights

    name = str(model or weights)
    if random_init:
        described = "random init (seed 0)"
    elif weights is None and name in TORCH_HUB_FILES:
        described = _fingerprint(find_hub_weights(name))
    else:
        described = None if weights is None else _fingerprint(weights)
    return {
        "model": _fingerprint(name) if Path(name).exists() else name,
        "weights": described,
        "descriptor": "cls token (x_norm_clstoken)",
        "image_size": f"resize {BACKBONE_RESIZE}, centre crop {BACKBONE_CROP}",
    }


def embedder(
    model: str | None, weights: Path | None = None, device: str = "auto", random_init: bool = False
) -> tuple[nn.Module, Any]:
    """(model, transform) for a curation embedding: 'pixel' (or 'thumbnail') gives the copy-detection
    ThumbnailDescriptor on 64 px images; anything else loads a backbone with the official eval transform (a hub
    name: its released weights from the local caches, or a seeded random init when `random_init`)."""
    from torchvision import transforms

    from dinoforge.data.transforms import eval_transform, normalize_transform

    if model in ("pixel", "thumbnail"):
        if weights is not None:
            raise DinoforgeError(
                f"the pixel descriptor takes no weights: drop --weights/weights ({weights}) or choose a backbone model"
            )
        if random_init:
            raise DinoforgeError("the pixel descriptor has no random init: drop --random-init/random_init")
        size = (PIXEL_IMAGE_SIZE, PIXEL_IMAGE_SIZE)
        return ThumbnailDescriptor(), transforms.Compose([transforms.Resize(size), normalize_transform()])
    from dinoforge.models.weights import load_model

    return load_model(model, weights, device, random_init), eval_transform(BACKBONE_RESIZE, BACKBONE_CROP)


def embed_images(
    data: str | Path,
    out_dir: str | Path,
    model: str | None = "pixel",
    weights: Path | None = None,
    shard_size: int = 10000,
    batch_size: int = 64,
    device: str = "auto",
    random_init: bool = False,
) -> dict[str, Any]:
    """Embed an image folder, a .txt/.csv/.jsonl list or `bundled[:split]` into shards (see embed_dataset)."""
    from dinoforge.utils import resolve_device

    net, transform = embedder(model, weights, device, random_init)
    identity = embedder_identity(model, weights, random_init)
    return embed_set(data, out_dir, net, transform, resolve_device(device), identity, shard_size, batch_size)


def embed_set(
    data: str | Path,
    out_dir: str | Path,
    net: nn.Module,
    transform: Any,
    device: torch.device,
    identity: dict[str, Any],
    shard_size: int = 10000,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Embed one image set with an embedder already loaded (`curate run` loads it once for all its sets)."""
    from dinoforge.data.datasets import build_dataset

    dataset = build_dataset(data, transform=transform)
    if len(dataset) == 0:
        raise DinoforgeError(f"no images found in {data}")
    return embed_dataset(net, dataset, out_dir, shard_size, batch_size, device, identity=identity)

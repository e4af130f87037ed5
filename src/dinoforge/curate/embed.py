"""Embed an image set into float16 shards (`shard_XXXXX.npy` + `.json` file list), sharded over torchrun ranks
and resumable: a shard whose `.json` exists is finished and is skipped on a re-run."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dinoforge.utils import DinoforgeError, eprint, write_json


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
        return str(getattr(self.base, "item_name", str)(self.start + i))


def rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's env, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> None:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when launched with WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def embed_dataset(
    model: nn.Module,
    dataset: Dataset,
    out_dir: str | Path,
    shard_size: int = 10000,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Embed this rank's shards (shard s goes to rank s mod world) into out_dir; finished shards are skipped.

    Each shard is written as float16 `.npy` (then read memory-mapped) plus a `.json` with the embedded
    paths in
    row order and the unreadable ones; the `.json` is written last, so a crash never leaves a shard that looks
    done. Returns counts for this rank."""
    from dinoforge.embed import extract_features

    n = len(dataset)
    if n == 0:
        raise DinoforgeError("nothing to embed: the image set is empty")
    r, w = rank_world()
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(n / shard_size)
    stats = {"images": n, "shards": n_shards, "embedded": 0, "skipped": 0, "resumed_shards": 0}
    for s in range(rank, n_shards, world_size):
        meta_path = out / f"shard_{s:05d}.json"
        if meta_path.exists():
            stats["resumed_shards"] += 1
            continue
        part = _Slice(dataset, s * shard_size, min(n, (s + 1) * shard_size))
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
        write_json(meta_path, {"shard": s, "start": s * shard_size, "paths": names, "skipped": skipped})
        stats["embedded"] += len(names)
        stats["skipped"] += len(skipped)
        if skipped:
            eprint(f"shard {s}: skipped {len(skipped)} unreadable image(s)")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return stats


def embedder(model: str | None, weights: Path | None = None, device: str = "auto") -> tuple[nn.Module, Any]:
    """(model, transform) for a curation embedding: 'pixel' (or 'thumbnail') gives the copy-detection
    ThumbnailDescriptor on 64 px images; anything else loads a backbone with the official eval transform."""
    from torchvision import transforms

    from dinoforge.data.transforms import eval_transform, normalize_transform

    if model in ("pixel", "thumbnail"):
        return ThumbnailDescriptor(), transforms.Compose([transforms.Resize((64, 64)), normalize_transform()])
    from dinoforge.cli_common import load_model_from_opts

    return load_model_from_opts(model, weights, device), eval_transform()


def embed_images(
    data: str | Path,
    out_dir: str | Path,
    model: str | None = "pixel",
    weights: Path | None = None,
    shard_size: int = 10000,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Embed an image folder, a .txt/.csv/.jsonl list or `bundled[:split]` into shards (see embed_dataset)."""
    from dinoforge.data.datasets import build_dataset
    from dinoforge.utils import resolve_device

    net, transform = embedder(model, weights, device)
    dataset = build_dataset(data, transform=transform)
    if len(dataset) == 0:
        raise DinoforgeError(f"no images found in {data}")
    return embed_dataset(net, dataset, out_dir, shard_size, batch_size, resolve_device(device))

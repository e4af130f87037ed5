"""dinoforge: a complete, runnable DINOv2 system.

One call per job, with the command line's defaults: `load_backbone` and `transform_for` (a model and its
preprocessing), `embed` (images → an array of features), `pretrain` (`dinoforge train` on a folder), `curate_pool`
(`dinoforge curate run`: a pool → a manifest). `dinoforge.train` and `dinoforge.curate` are the subpackages, hence
those two names. Imports are lazy, so `import dinoforge` stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

__version__ = "0.1.0"

Overrides = Mapping[str, Any] | Sequence[str] | None


def _dotlist(overrides: Overrides) -> list[str]:
    """`{"optim.epochs": 2}` or `["optim.epochs=2"]` → the command line's `key=value` list."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{k}={v}" for k, v in overrides.items()]
    return list(overrides)


def load_backbone(
    name_or_path: str | Path,
    weights: str | Path | None = None,
    device: str = "cpu",
    *,
    random_init: bool = False,
    **overrides: Any,
) -> torch.nn.Module:
    """A backbone by hub name (released weights from the torch.hub or HF cache, never downloaded) or from a weights
    file or folder; see `dinoforge.models.weights.load_backbone`."""
    from dinoforge.models.weights import load_backbone as load

    return load(name_or_path, weights, device, random_init=random_init, **overrides)


def transform_for(model: torch.nn.Module, size: int | None = None):
    """The PIL image → tensor preprocessing of `dinoforge embed` for `model`: resize 256 / centre crop 224 and the
    ImageNet normalisation, or with `size` the shorter side at `size` px, cropped to a multiple of the patch."""
    from dinoforge.data.transforms import embed_transform

    return embed_transform(None, size, int(getattr(model, "patch_size", 14)))[0]


def embed(
    images: str | Path | Sequence[str | Path],
    model: str | Path | torch.nn.Module | None = None,
    *,
    weights: str | Path | None = None,
    random_init: bool = False,
    size: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> np.ndarray:
    """CLS features [N, D] (float32, the backbone's normed CLS token; `model` a hub name, a weights path or a loaded
    backbone, default dinov2_vits14 unless `weights` are given) of a folder (rows in sorted path order, as
    `dinoforge embed` lists them in files.txt), a file list, `bundled[:split]`, or a list of image paths (rows in
    that order). An unreadable image is an error, so rows always match the images."""
    from dinoforge.data.datasets import CroppedPathDataset, build_dataset
    from dinoforge.data.transforms import embed_transform
    from dinoforge.features import extract_features
    from dinoforge.models.weights import load_model
    from dinoforge.utils import DinoforgeError, resolve_device

    if model is None or isinstance(model, str | Path):  # default: ViT-S/14, or the architecture `weights` carry
        name = str(model) if model is not None else None if weights is not None else "dinov2_vits14"
        net = load_model(name, weights, device, random_init)
    else:
        net = model.to(resolve_device(device))
    spec = None if isinstance(images, Sequence) and not isinstance(images, str) else str(images)
    transform, canvas = embed_transform(spec, size, int(getattr(net, "patch_size", 14)))
    if spec is None:
        dataset = CroppedPathDataset([Path(p) for p in images], [None] * len(images), transform)
    else:
        dataset = build_dataset(spec, transform=transform, size=canvas or 32)
    if len(dataset) == 0:
        raise DinoforgeError(f"no images found in {spec or 'the empty list'}")
    out = extract_features(net, dataset, batch_size, next(net.parameters()).device)
    if len(out["skipped_names"]):
        raise DinoforgeError(f"{len(out['skipped_names'])} unreadable image(s), first: {out['skipped_names'][0]}")
    return out["cls"]


def pretrain(
    data: str | Path | None = None,
    output_dir: str | Path = "runs/train",
    *,
    config: str | Path | None = None,
    time: str | None = None,
    resume: bool = False,
    overrides: Overrides = None,
) -> dict:
    """`dinoforge train`: pretrain on `data` into `output_dir`; with no `config`, the recipe is chosen from the
    images and this machine; `time` ("10m") fits the run to a wall-clock budget. Returns the run's summary, whose
    "teacher" is the exported backbone (`load_backbone(summary["teacher"])`)."""
    from dinoforge.train.cli import run_train

    return run_train(
        None if config is None else str(config),
        None if data is None else str(data),
        Path(output_dir),
        resume,
        time,
        _dotlist(overrides),
    )


def curate_pool(
    pool: str | Path,
    output_dir: str | Path = "runs/curate",
    *,
    config: str | Path | None = None,
    overrides: Overrides = None,
) -> Path:
    """`dinoforge curate run`: embed, deduplicate, cluster and sample an image pool; returns the path of
    manifest.jsonl (for `pretrain(data=...)`). With no `config`, the built-in curation defaults (no sampling: every
    image left after dedup); `config="configs/curate_default.yaml"` is the command line's file; `overrides` sets any
    key, e.g. {"model": "dinov2_vits14"} for semantic embeddings."""
    from dinoforge.curate.config import load_config
    from dinoforge.curate.pipeline import run_pipeline
    from dinoforge.distributed import init_from_env

    init_from_env()
    cfg = load_config(config, [f"pool={pool}", *_dotlist(overrides)])
    run_pipeline(cfg, Path(output_dir))
    return Path(output_dir) / "manifest.jsonl"


__all__ = ["__version__", "curate_pool", "embed", "load_backbone", "pretrain", "transform_for"]

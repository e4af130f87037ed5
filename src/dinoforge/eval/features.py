"""Frozen-backbone features shared by all evaluations, cached on disk so a second run does not recompute.

Per image we keep the normed class token of the last `n` blocks (`cls`, N × n × D, last block last) and the
average of the last block's normed patch tokens (`patch_avg`, N × D), from `get_intermediate_layers`; k-NN,
logistic regression and retrieval use `cls[:, -1]` (the backbone's output), the linear probe all of them.
The cache key hashes the backbone (weights file path + mtime + size, else the state-dict bytes), the data
spec and the transform; an entry with at least the requested number of blocks is a hit. Entries live in
`$DINOFORGE_CACHE_DIR` (default `~/.cache/dinoforge/features`) as .npy files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch.utils.data import Dataset

from dinoforge.embed import frozen, image_batches
from dinoforge.utils import DinoforgeError, files_under, resolve_device

ARRAYS = ("cls", "patch_avg", "labels", "indices")

TrainDataOpt = Annotated[
    str, typer.Option("--train-data", help="Train images: bundled:train, an ImageFolder tree or a file list.")
]
ValDataOpt = Annotated[str, typer.Option("--val-data", help="Test images, same forms as --train-data.")]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        min=1,
        help="Eval side in px: centre crop (after resize side*256/224) for folders, canvas for bundled. "
        "Default: 224 for folders, the native 32 px (rounded to the patch) for the bundled set.",
    ),
]
CacheOpt = Annotated[
    bool,
    typer.Option("--cache/--no-cache", help="Reuse cached features of the same backbone + data + transform."),
]


def cache_root() -> Path:
    """Where feature caches live: $DINOFORGE_CACHE_DIR, else ~/.cache/dinoforge/features."""
    return Path(os.environ.get("DINOFORGE_CACHE_DIR") or Path.home() / ".cache" / "dinoforge" / "features")


def model_fingerprint(model: torch.nn.Module, weights: str | Path | None = None) -> str:
    """Identify a backbone: weights file by resolved path + mtime + size, else by its state-dict bytes."""
    if weights is not None and Path(weights).exists():
        p = Path(weights).resolve()
        return "file:" + _files_hash(files_under(p))
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "state:" + h.hexdigest()


def feature_key(model_id: str, data: str, transform: str) -> str:
    """Cache key of one (backbone, data, transform) triple."""
    blob = json.dumps({"model": model_id, "data": data, "transform": transform}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def extract_multilayer(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    n_last_blocks: int = 1,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """Class tokens of the last `n_last_blocks` blocks and the last block's mean patch token, per image.

    Corrupt images (dataset items that are None) are skipped; rows follow the dataset order."""
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    n = len(dataset)
    n_last_blocks = min(n_last_blocks, int(getattr(model, "n_blocks", n_last_blocks)))
    cls_rows, avg_rows, labels, indices = [], [], [], []
    with frozen(model, dev):
        for x, y, idx in image_batches(dataset, batch_size, desc):
            layers = model.get_intermediate_layers(x.to(dev), n=n_last_blocks, return_class_token=True)
            cls_rows.append(torch.stack([c for _, c in layers], dim=1).float().cpu())
            avg_rows.append(layers[-1][0].float().mean(dim=1).cpu())
            labels.append(y)
            indices.append(idx)
    if not cls_rows:
        raise DinoforgeError(f"no readable image among the {n} items of the dataset")
    order = torch.cat(indices).argsort(stable=True)
    return {
        "cls": torch.cat(cls_rows)[order].numpy(),
        "patch_avg": torch.cat(avg_rows)[order].numpy(),
        "labels": torch.cat(labels)[order].numpy(),
        "indices": torch.cat(indices)[order].numpy(),
    }


def cached(
    key: str, compute: Callable[[], dict[str, np.ndarray]], n_last_blocks: int = 1, root: Path | None = None
) -> dict[str, np.ndarray]:
    """Load the entry `key` if it holds >= n_last_blocks blocks, else run `compute` and store its arrays."""
    folder = (root or cache_root()) / key
    if (folder / "meta.json").exists():
        meta = json.loads((folder / "meta.json").read_text())
        if meta["n_blocks"] >= n_last_blocks:
            feats = {name: np.load(folder / f"{name}.npy") for name in ARRAYS}
            feats["cls"] = feats["cls"][:, -n_last_blocks:]
            return feats
    feats = compute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
    for name in ARRAYS:
        np.save(tmp / f"{name}.npy", feats[name])
    (tmp / "meta.json").write_text(json.dumps({"n_blocks": int(feats["cls"].shape[1]), "n": len(feats["labels"])}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return feats


def eval_transform_for(spec: str, image_size: int | None, patch_size: int) -> tuple[Any, int]:
    """(transform, bundled canvas size) for a data spec: the bundled set at its native size rounded up to
    the patch, other data with the official resize (side * 256/224) + centre crop (a patch multiple)."""
    from dinoforge.data.transforms import eval_transform, normalize_transform

    if spec.split(":")[0] in ("bundled", "bundled-full") and not Path(spec).exists():
        return normalize_transform(), math.ceil((image_size or 32) / patch_size) * patch_size
    crop = max(patch_size, (image_size or 224) // patch_size * patch_size)
    return eval_transform(resize=round(crop * 256 / 224), crop=crop), 0


def _files_hash(paths) -> str:
    """Hash of (path, size, mtime) of files, so that a file rewritten in place changes it."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def dataset_features(
    net: torch.nn.Module,
    fingerprint: str,
    spec: str,
    batch_size: int,
    image_size: int | None,
    use_cache: bool,
    n_last_blocks: int = 1,
    split: str = "train",
    data_id: str | None = None,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Features of one data spec (bundled:train, folder, file list), from the cache when possible, plus the
    dataset's class names under "classes" (the label index) and the unreadable images' names under "skipped_names".

    The cache key uses `data_id` when given (else the resolved folder/file list), the class list, and the
    path, size and modification time of every image, so edited or replaced images are embedded again."""
    from dinoforge.data.datasets import build_dataset

    transform, canvas = eval_transform_for(spec, image_size, int(getattr(net, "patch_size", 14)))
    dataset = build_dataset(spec, transform=transform, split=split, size=canvas or 32, classes=classes)
    if len(dataset) == 0:
        raise DinoforgeError(f"no images found in {spec}")
    source = getattr(dataset, "root", None) or getattr(dataset, "manifest", None)
    data_id = data_id or (str(Path(source).resolve()) if source else f"{spec}|{split}")
    files = _files_hash(getattr(dataset, "paths", []))  # the bundled set has no files: a constant
    data_key = f"{data_id}|{len(dataset)}|{getattr(dataset, 'classes', [])}|{files}"
    key = feature_key(fingerprint, data_key, f"{transform!r}|{canvas}")
    dev = next(net.parameters()).device
    n_last_blocks = min(n_last_blocks, int(getattr(net, "n_blocks", n_last_blocks)))

    def compute() -> dict[str, np.ndarray]:
        return extract_multilayer(net, dataset, batch_size, dev, n_last_blocks, desc=f"features {spec}")

    feats = cached(key, compute, n_last_blocks) if use_cache else compute()
    skipped = np.setdiff1d(np.arange(len(dataset)), feats["indices"])
    return {
        **feats,
        "classes": list(getattr(dataset, "classes", [])),
        "skipped_names": [dataset.item_name(int(i)) for i in skipped],
    }


def features_from_opts(
    model: str | None,
    weights: Path | None,
    specs: Sequence[str],
    out: Path,
    batch_size: int,
    device: str,
    image_size: int | None,
    use_cache: bool,
    n_last_blocks: int = 1,
) -> list[dict[str, Any]]:
    """Load the backbone from CLI options and return (cached) features for each labelled data spec, in order.

    The first spec is read as the train split and the others as the val split of a folder with such
    sub-folders; class names index labels in the first spec's order, so every split agrees. Unlabelled data
    is an error. `out` is created so the command can write its metrics there."""
    from dinoforge.cli_common import load_model_from_opts

    splits = ["train" if i == 0 and len(specs) > 1 else "val" for i in range(len(specs))]
    classes = None  # the first spec's, once read
    net = load_model_from_opts(model, weights, device)
    fingerprint = model_fingerprint(net, weights if weights is not None else model)
    Path(out).mkdir(parents=True, exist_ok=True)
    result = []
    for spec, split in zip(specs, splits, strict=True):
        feats = dataset_features(
            net, fingerprint, spec, batch_size, image_size, use_cache, n_last_blocks, split, classes=classes
        )
        if (feats["labels"] < 0).any():
            raise DinoforgeError(
                f"{spec} has unlabelled images: this evaluation needs class labels (one sub-folder per class, "
                "or a file list with labels)"
            )
        classes = classes or feats["classes"] or None
        result.append(feats)
    return result


def path_list_features(
    model: str | None,
    weights: Path | None,
    path_lists: Sequence[Sequence[Path]],
    out: Path,
    batch_size: int,
    device: str,
    image_size: int | None,
    use_cache: bool,
) -> list[np.ndarray]:
    """Final CLS features (N × D) of explicit image path lists (retrieval queries and database).

    A missing image is an error; the lists are written as file lists into `out` and cached by content."""
    missing = [str(p) for paths in path_lists for p in paths if not Path(p).is_file()]
    if missing:
        raise DinoforgeError(f"{len(missing)} image(s) not found, e.g. {missing[0]}")
    Path(out).mkdir(parents=True, exist_ok=True)
    specs = []
    for i, paths in enumerate(path_lists):
        manifest = Path(out) / f"images_{i}.txt"
        manifest.write_text("".join(f"{Path(p).resolve()}\n" for p in paths))
        specs.append(str(manifest))
    from dinoforge.cli_common import load_model_from_opts

    net = load_model_from_opts(model, weights, device)
    fingerprint = model_fingerprint(net, weights if weights is not None else model)
    result = []
    for spec, paths in zip(specs, path_lists, strict=True):
        # keyed by the listed paths, not the manifest location, so another --out still hits the cache
        content = hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        feats = dataset_features(net, fingerprint, spec, batch_size, image_size, use_cache, data_id=f"paths:{content}")
        if len(feats["indices"]) != len(paths):
            raise DinoforgeError(f"{len(paths) - len(feats['indices'])} unreadable image(s) in the retrieval set")
        result.append(feats["cls"][:, -1])
    return result

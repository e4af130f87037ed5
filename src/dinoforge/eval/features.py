"""The evaluations' features (from the one extractor, `dinoforge.features`) with their on-disk cache, and
embedding an image set to files.

Per image the evaluations keep the normed class token of the last `n` blocks (`cls`, N × n × D, last block
last) and the average of the last block's normed patch tokens (`patch_avg`, N × D), from
`get_intermediate_layers`; k-NN, logistic regression and retrieval use `cls[:, -1]` (the backbone's output),
the linear probe all of them.
The cache key hashes the backbone (weights file path + mtime + size, else the state-dict bytes), the data
spec and the transform; an entry with at least the requested number of blocks is a hit. Entries live in
`$DINOFORGE_CACHE_DIR` (default `~/.cache/dinoforge/features`) as .npy files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinoforge.data.transforms import eval_transform_for
from dinoforge.features import extract_features
from dinoforge.utils import DinoforgeError, files_under, write_json

ARRAYS = ("cls", "patch_avg", "labels", "indices")


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
    boxes: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, Any]:
    """Features of one data spec (bundled:train, folder, file list), from the cache when possible, plus the
    dataset's class names under "classes" (the label index) and the unreadable images' names under "skipped_names".

    The cache key uses `data_id` when given (else the resolved folder/file list), the class list, and the
    path, size and modification time of every image, so edited or replaced images are embedded again.
    `boxes` (one per listed image, None = whole image; a file list only) crop each image before the transform;
    `data_id` must then identify the boxes too."""
    from dinoforge.data.datasets import CroppedPathDataset, build_dataset

    transform, canvas = eval_transform_for(spec, image_size, int(getattr(net, "patch_size", 14)))
    dataset = build_dataset(spec, transform=transform, split=split, size=canvas or 32, classes=classes)
    if boxes is not None:
        dataset = CroppedPathDataset(dataset.paths, boxes, transform)
    if len(dataset) == 0:
        raise DinoforgeError(f"no images found in {spec}")
    source = getattr(dataset, "root", None) or getattr(dataset, "manifest", None)
    data_id = data_id or (str(Path(source).resolve()) if source else f"{spec}|{split}")
    files = _files_hash(getattr(dataset, "shards", None) or getattr(dataset, "paths", []))  # bundled: a constant
    data_key = f"{data_id}|{len(dataset)}|{getattr(dataset, 'classes', [])}|{files}"
    key = feature_key(fingerprint, data_key, f"{transform!r}|{canvas}")
    dev = next(net.parameters()).device
    n_last_blocks = min(n_last_blocks, int(getattr(net, "n_blocks", n_last_blocks)))

    def compute() -> dict[str, np.ndarray]:
        feats = extract_features(
            net, dataset, batch_size, dev, desc=f"features {spec}", layers=n_last_blocks, patch_mean=True
        )
        return {name: feats[name] for name in ARRAYS}

    feats = cached(key, compute, n_last_blocks) if use_cache else compute()
    skipped = np.setdiff1d(np.arange(len(dataset)), feats["indices"])
    return {
        **feats,
        "classes": list(getattr(dataset, "classes", [])),
        "skipped_names": [dataset.item_name(int(i)) for i in skipped],
    }


def labelled_features(
    net: torch.nn.Module,
    fingerprint: str,
    specs: Sequence[str],
    out: Path,
    batch_size: int,
    image_size: int | None,
    use_cache: bool,
    n_last_blocks: int = 1,
) -> list[dict[str, Any]]:
    """(Cached) features of a backbone for each labelled data spec, in order.

    The first spec is read as the train split and the others as the val split of a folder with such
    sub-folders; class names index labels in the first spec's order, so every split agrees. Unlabelled data
    is an error. `out` is created so the evaluation can write its metrics there."""
    from dinoforge.data.datasets import require_labels

    Path(out).mkdir(parents=True, exist_ok=True)
    splits = ["train" if i == 0 and len(specs) > 1 else "val" for i in range(len(specs))]
    classes = None  # the first spec's, once read
    result = []
    for spec, split in zip(specs, splits, strict=True):
        feats = dataset_features(
            net, fingerprint, spec, batch_size, image_size, use_cache, n_last_blocks, split, classes=classes
        )
        require_labels(feats["labels"], spec, "this evaluation")
        classes = classes or feats["classes"] or None
        result.append(feats)
    return result


def path_list_features(
    net: torch.nn.Module,
    fingerprint: str,
    path_lists: Sequence[Sequence[Path]],
    out: Path,
    batch_size: int,
    image_size: int | None,
    use_cache: bool,
    boxes: Sequence[Sequence[Sequence[float] | None] | None] | None = None,
) -> list[np.ndarray]:
    """Final CLS features (N × D) of a backbone for explicit image path lists (retrieval queries and
    database); the lists are written as file lists into `out` and cached by content. `boxes`, one entry per
    list (None = no crops), crops that list's images to their `[x1, y1, x2, y2]` box (None = whole image)."""
    boxes = list(boxes) if boxes is not None else [None] * len(path_lists)
    Path(out).mkdir(parents=True, exist_ok=True)
    specs = []
    for i, paths in enumerate(path_lists):
        manifest = Path(out) / f"images_{i}.txt"
        manifest.write_text("".join(f"{Path(p).resolve()}\n" for p in paths))
        specs.append(str(manifest))
    result = []
    for spec, paths, crops in zip(specs, path_lists, boxes, strict=True):
        # keyed by the listed paths (and boxes), not the manifest location, so another --out still hits the cache
        h = hashlib.sha256(Path(spec).read_bytes())
        if crops is not None:
            h.update(json.dumps([None if b is None else [float(x) for x in b] for b in crops]).encode())
        data_id = f"paths:{h.hexdigest()}"
        feats = dataset_features(
            net, fingerprint, spec, batch_size, image_size, use_cache, data_id=data_id, boxes=crops
        )
        if len(feats["indices"]) != len(paths):
            raise DinoforgeError(f"{len(paths) - len(feats['indices'])} unreadable image(s) in the retrieval set")
        result.append(feats["cls"][:, -1])
    return result


def save_embeddings(
    net: torch.nn.Module,
    data: str,
    out: Path,
    *,
    patch_tokens: bool = False,
    size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed an image set (folder, file list, bundled) into `out`: features.npy (CLS), patch_tokens.npy
    (`patch_tokens`), labels.npy, files.txt (embedded items in row order), skipped.txt (corrupt/non-image
    files) and meta.json, which starts with `record` (what the backbone is); returns the meta."""
    from dinoforge.data.datasets import build_dataset, skipped_summary
    from dinoforge.data.transforms import embed_transform

    patch_size = int(getattr(net, "patch_size", 14))
    transform, bundled_size = embed_transform(data, size, patch_size)
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
    meta = {
        **(record or {}),
        "data": data,
        "transform": repr(transform),
        "num_images": int(len(feats["cls"])),
        "dim": int(feats["cls"].shape[1]),
        "patch_tokens_shape": list(feats["patch"].shape) if patch_tokens else None,
        **skipped_summary(feats["skipped_names"]),
        "num_non_image_files": len(ignored),
        "classes": list(getattr(dataset, "classes", [])),
        "device": str(dev),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(feats["cls"]) / max(seconds, 1e-9), 2),
    }
    write_json(out / "meta.json", meta)
    return meta

"""Frozen-backbone features: the one extractor (`extract_features`, per batch `batch_features`) that embed,
every evaluation, the dense probes, curation and the figures use, and the evaluations' on-disk feature cache.

Per image the evaluations keep the normed class token of the last `n` blocks (`cls`, N × n × D, last block
last) and the average of the last block's normed patch tokens (`patch_avg`, N × D), from
`get_intermediate_layers`; k-NN, logistic regression and retrieval use `cls[:, -1]` (the backbone's output),
the linear probe all of them.
The cache key hashes the backbone (weights file path + mtime + size, else the state-dict bytes), the data
spec and the transform; an entry with at least the requested number of blocks is a hit. Entries live in
`$DINOFORGE_CACHE_DIR` (default `~/.cache/dinoforge/features`) as .npy files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinoforge.utils import DinoforgeError, files_under, resolve_device, track, write_json

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


def _autocast(device: torch.device, enabled: bool = True):
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def frozen(model: torch.nn.Module, device: torch.device, autocast: bool = True) -> Iterator[None]:
    """`model` on `device` in eval mode, under inference mode (and autocast on CUDA unless `autocast` is
    False); its mode restored after."""
    was_training = model.training
    model.to(device).eval()
    try:
        with torch.inference_mode(), _autocast(device, autocast):
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


def batch_features(
    model: torch.nn.Module, x: torch.Tensor, layers: int | Sequence[int] | None = None, norm: bool = True
) -> dict[str, torch.Tensor]:
    """Features of one batch of images (call it under `frozen`).

    Without `layers`: the output's normed class token "cls" [B, D] and patch tokens "patch" [B, P, D]
    (`forward_features`; no "patch" for a model without patch tokens, such as a pixel descriptor). With
    `layers` (a last-n count or block indices): each layer's class token "cls" [B, L, D] and patch tokens
    "patch" [B, L, P, D], normed unless `norm` is False (`get_intermediate_layers`)."""
    if layers is None:
        out = model.forward_features(x)
        names = {"cls": "x_norm_clstoken", "patch": "x_norm_patchtokens"}
        return {name: out[key] for name, key in names.items() if out.get(key) is not None}
    outs = model.get_intermediate_layers(x, n=layers, return_class_token=True, norm=norm)
    return {"cls": torch.stack([c for _, c in outs], dim=1), "patch": torch.stack([p for p, _ in outs], dim=1)}


def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    patch_tokens: bool = False,
    num_workers: int = 0,
    desc: str = "embedding",
    *,
    layers: int | Sequence[int] | None = None,
    norm: bool = True,
    patch_mean: bool = False,
    dtype: type = np.float32,
    autocast: bool = True,
) -> dict[str, Any]:
    """Run a frozen backbone over a dataset of `(tensor, label, index)` items (None = corrupt, skipped), in
    batches with a progress bar: the one feature extractor of embed, evaluation, dense probes and curation.

    Returns "cls" [N, D] ([N, L, D] with `layers`, see `batch_features`), "patch" [N, P, D] ([N, L, P, D])
    when `patch_tokens`, "patch_avg" [N, D] (mean of the last layer's patch tokens) when `patch_mean`, all
    as `dtype`; "labels" and "indices" (dataset indices kept, in order), "skipped" (indices of corrupt items)
    and "skipped_names"."""
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    n = len(dataset)
    rows: dict[str, np.ndarray] = {}
    labels = np.empty(n, dtype=np.int64)
    indices = np.empty(n, dtype=np.int64)
    k = 0

    def put(name: str, value: torch.Tensor) -> None:
        v = value.float().cpu().numpy()
        if name not in rows:
            rows[name] = np.empty((n, *v.shape[1:]), dtype=dtype)
        elif v.shape[1:] != rows[name].shape[1:]:
            raise DinoforgeError(
                f"patch tokens need equal token grids, got {v.shape[-2]} and {rows[name].shape[-2]} "
                "patches; use a fixed-size transform (centre crop)"
            )
        rows[name][k : k + len(v)] = v

    with frozen(model, dev, autocast):
        for x, y, idx in image_batches(dataset, batch_size, desc, num_workers, pin_memory=dev.type == "cuda"):
            out = batch_features(model, x.to(dev, non_blocking=True), layers, norm)
            put("cls", out["cls"])
            if patch_tokens:
                put("patch", out["patch"])
            if patch_mean:
                last = out["patch"] if layers is None else out["patch"][:, -1]
                put("patch_avg", last.float().mean(dim=1))
            labels[k : k + len(y)] = y.numpy()
            indices[k : k + len(y)] = idx.numpy()
            k += len(y)
    if not rows:
        raise DinoforgeError(f"no readable image among the {n} items of the dataset")
    order = np.argsort(indices[:k], kind="stable")
    skipped = np.setdiff1d(np.arange(n), indices[:k])
    name = getattr(dataset, "item_name", str)
    return {
        **{key: value[:k][order] for key, value in rows.items()},
        "labels": labels[:k][order],
        "indices": indices[:k][order],
        "skipped": skipped,
        "skipped_names": [name(int(i)) for i in skipped],
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
    Path(out).mkdir(parents=True, exist_ok=True)
    splits = ["train" if i == 0 and len(specs) > 1 else "val" for i in range(len(specs))]
    classes = None  # the first spec's, once read
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
    net: torch.nn.Module,
    fingerprint: str,
    path_lists: Sequence[Sequence[Path]],
    out: Path,
    batch_size: int,
    image_size: int | None,
    use_cache: bool,
) -> list[np.ndarray]:
    """Final CLS features (N × D) of a backbone for explicit image path lists (retrieval queries and
    database); the lists are written as file lists into `out` and cached by content."""
    Path(out).mkdir(parents=True, exist_ok=True)
    specs = []
    for i, paths in enumerate(path_lists):
        manifest = Path(out) / f"images_{i}.txt"
        manifest.write_text("".join(f"{Path(p).resolve()}\n" for p in paths))
        specs.append(str(manifest))
    result = []
    for spec, paths in zip(specs, path_lists, strict=True):
        # keyed by the listed paths, not the manifest location, so another --out still hits the cache
        content = hashlib.sha256(Path(spec).read_bytes()).hexdigest()
        feats = dataset_features(net, fingerprint, spec, batch_size, image_size, use_cache, data_id=f"paths:{content}")
        if len(feats["indices"]) != len(paths):
            raise DinoforgeError(f"{len(paths) - len(feats['indices'])} unreadable image(s) in the retrieval set")
        result.append(feats["cls"][:, -1])
    return result


def _embed_transform(data: str, size: int | None, patch_size: int) -> tuple[Any, int | None]:
    """The transform of `dinoforge embed`: bundled images at their native size (rounded up to the patch),
    otherwise the official resize 256 / crop 224, or an aspect-keeping `size`."""
    from dinoforge.data.transforms import eval_transform, eval_transform_size, normalize_transform

    if data.split(":")[0] in ("bundled", "bundled-full") and not Path(data).exists():
        return normalize_transform(), math.ceil((size or 32) / patch_size) * patch_size
    if size is None:
        return eval_transform(), None
    return eval_transform_size(size, patch_size), None


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

    patch_size = int(getattr(net, "patch_size", 14))
    transform, bundled_size = _embed_transform(data, size, patch_size)
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

"""The one frozen-feature extractor: a backbone run in eval mode under inference mode over a dataset, in
batches with a progress bar (`extract_features`; per batch `batch_features`). Embedding, every evaluation, the
dense probes, curation and the figures use it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinoforge.utils import DinoforgeError, resolve_device, track


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

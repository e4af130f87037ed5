"""Linear probe on frozen features: many heads trained at once in one pass over cached features (DINOv2 §7).

Each head is a linear classifier on one input layout — class tokens of the last 1 or 4 blocks, optionally
concatenated with the average-pooled patch tokens of the last block — and one learning rate of a grid.
All heads see the same mini-batches (SGD, momentum 0.9, cosine decay to 0, lr scaled by batch/256 as
in the official recipe); the best head is chosen on a validation split (held out from train if none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dinoforge.data.datasets import skipped_summary
from dinoforge.eval.features import ARRAYS, labelled_features
from dinoforge.utils import DinoforgeError, resolve_device, track, write_json

DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


def linear_input(cls: torch.Tensor, patch_avg: torch.Tensor | None, n_blocks: int, avgpool: bool) -> torch.Tensor:
    """Head input: CLS of the last `n_blocks` blocks (cls is N × blocks × D, last block last), + avgpool."""
    parts = [cls[:, -n_blocks:].flatten(1)]
    if avgpool:
        if patch_avg is None:
            raise DinoforgeError("avgpool head requested but no pooled patch features were extracted")
        parts.append(patch_avg)
    return torch.cat(parts, dim=1).float()


def head_configs(
    available_blocks: int, n_blocks: Sequence[int], avgpool: Sequence[bool], lrs: Sequence[float]
) -> list[dict]:
    """All (blocks, avgpool, lr) combinations that the extracted features support."""
    usable = [n for n in n_blocks if n <= available_blocks]
    if not usable:
        raise DinoforgeError(f"features hold {available_blocks} block(s); none of n_blocks={list(n_blocks)} fits")
    return [{"n_blocks": n, "avgpool": a, "lr": lr} for n in usable for a in avgpool for lr in lrs]


def _head_name(cfg: dict) -> str:
    return f"blocks{cfg['n_blocks']}_avgpool{int(cfg['avgpool'])}_lr{cfg['lr']:g}"


def _accuracies(heads, layouts, cls, patch_avg, labels, batch_size: int, device) -> list[float]:
    correct = torch.zeros(len(heads))
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            c = cls[start : start + batch_size].to(device)
            p = None if patch_avg is None else patch_avg[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            inputs = {lay: linear_input(c, p, *lay) for lay in layouts}
            for i, (head, lay) in enumerate(heads):
                correct[i] += (head(inputs[lay]).argmax(1) == y).sum().item()
    return (100.0 * correct / max(1, len(labels))).tolist()


def linear_probe(
    train: dict,
    test: dict,
    val: dict | None = None,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 10,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Train every head on `train` (dicts of tensors: cls N×B×D, optional patch_avg N×D, labels N).

    Returns the best head (by validation top-1) with its test top-1, and every head's val/test top-1.
    """
    device = resolve_device(str(device))
    g = torch.Generator().manual_seed(seed)
    cls, patch_avg, labels = train["cls"], train.get("patch_avg"), train["labels"].long()
    if val is None:
        perm = torch.randperm(len(labels), generator=g)
        n_val = max(1, int(len(labels) * val_fraction))
        if n_val >= len(labels):
            raise DinoforgeError("train set too small to hold out a validation split")
        vi, ti = perm[:n_val], perm[n_val:]
        val = {
            "cls": cls[vi],
            "patch_avg": None if patch_avg is None else patch_avg[vi],
            "labels": labels[vi],
        }
        cls, labels = cls[ti], labels[ti]
        patch_avg = None if patch_avg is None else patch_avg[ti]
    num_classes = int(max(labels.max(), test["labels"].max(), val["labels"].max())) + 1
    configs = head_configs(cls.shape[1], n_blocks, avgpool if patch_avg is not None else [False], lrs)
    heads = []
    for cfg in configs:
        lay = (cfg["n_blocks"], cfg["avgpool"])
        in_dim = linear_input(cls[:1], None if patch_avg is None else patch_avg[:1], *lay).shape[1]
        head = torch.nn.Linear(in_dim, num_classes).to(device)
        torch.nn.init.normal_(head.weight, std=0.01, generator=g)
        torch.nn.init.zeros_(head.bias)
        heads.append((head, lay))
    layouts = sorted({lay for _, lay in heads})
    scale = batch_size / 256
    opt = torch.optim.SGD(
        [{"params": h.parameters(), "lr": cfg["lr"] * scale} for (h, _), cfg in zip(heads, configs, strict=True)],
        momentum=0.9,
        weight_decay=0.0,
    )
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    for _ in track(range(epochs), "linear probe epochs", total=epochs):
        perm = torch.randperm(len(labels), generator=g)
        for start in range(0, len(labels), batch_size):
            idx = perm[start : start + batch_size]
            c = cls[idx].to(device)
            p = None if patch_avg is None else patch_avg[idx].to(device)
            y = labels[idx].to(device)
            inputs = {lay: linear_input(c, p, *lay) for lay in layouts}
            loss = sum(F.cross_entropy(head(inputs[lay]), y) for head, lay in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    val_acc = _accuracies(heads, layouts, val["cls"], val.get("patch_avg"), val["labels"], 1024, device)
    test_acc = _accuracies(heads, layouts, test["cls"], test.get("patch_avg"), test["labels"], 1024, device)
    best = max(range(len(heads)), key=lambda i: val_acc[i])
    return {
        "best_head": _head_name(configs[best]),
        "best": dict(configs[best], val_top1=val_acc[best], top1=test_acc[best]),
        "top1": test_acc[best],
        "heads": {
            _head_name(cfg): dict(cfg, val_top1=v, top1=t) for cfg, v, t in zip(configs, val_acc, test_acc, strict=True)
        },
    }


def run_linear_eval(
    net: torch.nn.Module,
    fingerprint: str,
    train_data: str,
    val_data: str,
    out: Path,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: int = 10,
    head_batch_size: int = 256,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    use_cache: bool = True,
) -> dict:
    """Linear probe of a backbone on the last 4 blocks' features, train → val data specs; writes
    metrics.json (best head and every head) into `out` and returns the metrics."""
    tr, te = labelled_features(
        net, fingerprint, [train_data, val_data], out, batch_size, image_size, use_cache, n_last_blocks=4
    )
    metrics = linear_probe(
        {k: torch.from_numpy(tr[k]) for k in ARRAYS},
        {k: torch.from_numpy(te[k]) for k in ARRAYS},
        lrs=lrs,
        epochs=epochs,
        batch_size=head_batch_size,
        device=device,
    )
    metrics.update(
        train_data=train_data, val_data=val_data, **skipped_summary(tr["skipped_names"] + te["skipped_names"])
    )
    write_json(Path(out) / "metrics.json", metrics)
    return metrics

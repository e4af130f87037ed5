"""Full fine-tuning of a backbone with a linear classification head (`dinoforge finetune`).

The head reads the normed CLS token, or CLS ⊕ the mean of the normed patch tokens (the linear probe's one-block
layouts, eval/linear.py). AdamW over the pretraining's param groups (layer-wise lr decay, no weight decay on biases,
norms and LayerScale), the pretraining's cosine schedule with a linear warm-up, the backbone's own stochastic depth.
Data order and augmentations are those of training (train/data.py: a function of seed, step and position), a
checkpoint is written after every epoch, and a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from dinoforge.data.datasets import build_dataset, require_labels, skipped_summary
from dinoforge.data.transforms import eval_side, eval_transform_for, finetune_transform
from dinoforge.features import frozen, image_batches
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weights import save_backbone
from dinoforge.train.checkpoint import load_newest_checkpoint, restore_training_state, rng_state, save_checkpoint
from dinoforge.train.data import SeededAugment, StepSampler, seed_everything, seed_step
from dinoforge.train.logging import Progress
from dinoforge.train.param_groups import apply_optim_scheduler, fuse_params_groups, get_params_groups_with_decay
from dinoforge.train.schedules import CosineScheduler
from dinoforge.utils import DinoforgeError, eprint, progress_enabled, write_json

FEATURES = ("cls", "cls+avgpool")
HEAD_INIT_STD = 0.01  # the linear probe's head init (normal, std 0.01, zero bias)


@dataclass(frozen=True)
class FinetuneSettings:
    """What a fine-tuning run does; a --resume must ask for the same (checked)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 1
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    min_scale: float = 0.08
    features: str = "cls+avgpool"
    image_size: int | None = None
    seed: int = 0


class Classifier(nn.Module):
    """A backbone and a linear head on its normed CLS token (`cls`) or CLS ⊕ mean normed patch token
    (`cls+avgpool`), initialised like the linear probe's heads from `seed`."""

    def __init__(self, backbone: DinoVisionTransformer, num_classes: int, features: str = "cls+avgpool", seed: int = 0):
        super().__init__()
        if features not in FEATURES:
            raise DinoforgeError(f"unknown head features {features!r}: choose {' or '.join(FEATURES)}")
        self.backbone, self.features = backbone, features
        dim = backbone.embed_dim * (2 if features == "cls+avgpool" else 1)
        self.head = nn.Linear(dim, num_classes, device=backbone.cls_token.device)
        g = torch.Generator(device=self.head.weight.device).manual_seed(seed)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD, generator=g)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone.forward_features(x)
        parts = [out["x_norm_clstoken"]]
        if self.features == "cls+avgpool":
            parts.append(out["x_norm_patchtokens"].mean(dim=1))
        return self.head(torch.cat(parts, dim=1))


def build_optimizer(model: Classifier, settings: FinetuneSettings) -> torch.optim.AdamW:
    """AdamW over the fused param groups: lr × layer_decay^(depth + 1 − layer) in the backbone (embeddings 0,
    block i at i + 1, the final norm and the head at 1×), no weight decay on biases, norms and LayerScale."""
    groups = fuse_params_groups(get_params_groups_with_decay(model, lr_decay_rate=settings.layer_decay))
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_schedule(settings: FinetuneSettings, steps_per_epoch: int) -> CosineScheduler:
    """Per-step peak lr: linear warm-up from 0 over `warmup_epochs`, then a half-cosine down to `min_lr`."""
    return CosineScheduler(
        settings.lr,
        settings.min_lr,
        settings.epochs * steps_per_epoch,
        warmup_iters=settings.warmup_epochs * steps_per_epoch,
    )


def _labels(dataset: Dataset, spec: str) -> np.ndarray:
    labels = np.asarray(dataset.labels)
    if len(labels) == 0:
        raise DinoforgeError(f"no images found in {spec}")
    require_labels(labels, spec, "fine-tuning")
    return labels


def _collate(samples: list) -> tuple[Any, list[int]]:
    """(images, labels, indices) of the readable samples (None when none is) and the unreadable ones' indices."""
    kept = [s for s in samples if s[0] is not None]
    return (default_collate(kept) if kept else None), [index for image, _, index in samples if image is None]


def evaluate_top1(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device) -> tuple[float, set]:
    """Top-1 (%) of a classifier on a labelled dataset, in eval mode, and the indices of its unreadable images."""
    correct, seen = 0, set()
    with frozen(model, device):
        for x, y, idx in image_batches(dataset, batch_size, "validation"):
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            seen.update(idx.tolist())
    if not seen:
        raise DinoforgeError("no readable image in the validation data")
    return 100.0 * correct / len(seen), set(range(len(dataset))) - seen


def save_head(model: Classifier, classes: list[str], path: Path) -> Path:
    """The head as safetensors (`weight`, `bias`), its features and class names in the metadata."""
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    meta = {"format": "pt", "features": model.features, "classes": json.dumps(classes)}
    save_file(tensors, str(path), metadata=meta)
    return path


def finetune(
    backbone: DinoVisionTransformer,
    train_data: str,
    val_data: str,
    out: Path,
    settings: FinetuneSettings = FinetuneSettings(),
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    num_workers: int = 0,
    eval_batch_size: int = 256,
    quiet: bool = False,
    record: dict[str, Any] | None = None,
) -> dict:
    """Fine-tune `backbone` (its drop_path_rate is the stochastic depth) with a linear head on labelled train data,
    top-1 on the val data after each epoch; writes checkpoints/, metrics.json, backbone.safetensors (for
    load_backbone) and head.safetensors into `out`, and returns the metrics. `record` (what the backbone is) goes
    into metrics.json."""
    t0 = time.perf_counter()
    say = (lambda *_: None) if quiet else eprint
    device = torch.device(device)
    out = Path(out)
    patch = int(backbone.patch_size)
    side, bundled = eval_side(train_data, settings.image_size, patch)
    train_set = build_dataset(train_data, split="train", size=side if bundled else 32)
    train_labels = _labels(train_set, train_data)
    classes = list(getattr(train_set, "classes", []))
    val_tf, canvas = eval_transform_for(val_data, settings.image_size, patch)
    val_set = build_dataset(val_data, transform=val_tf, split="val", size=canvas or 32, classes=classes or None)
    val_labels = _labels(val_set, val_data)
    num_classes = len(classes) or int(max(train_labels.max(), val_labels.max())) + 1
    if settings.batch_size > len(train_set):
        raise DinoforgeError(f"--batch-size {settings.batch_size} is larger than the {len(train_set)} train images")

    seed_everything(settings.seed)
    model = Classifier(backbone, num_classes, settings.features, settings.seed).to(device).train()
    optimizer = build_optimizer(model, settings)
    steps_per_epoch = len(train_set) // settings.batch_size
    lrs = lr_schedule(settings, steps_per_epoch)
    ckpt_dir = out / "checkpoints"
    record = {**(record or {}), "drop_path_rate": backbone.arch.get("drop_path_rate", 0.0)}
    history: list[dict[str, Any]] = []
    skipped_train: dict[int, None] = {}
    start_epoch = 0
    if resume:
        newest = load_newest_checkpoint(ckpt_dir)
        if newest is None:
            say(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
        else:
            path, ckpt, unreadable = newest
            _check_same_run(ckpt, settings, record, path)
            restore_training_state(model, optimizer, ckpt, sharded=False, rank=0)
            history, skipped_train = ckpt["history"], dict.fromkeys(ckpt["skipped"])
            start_epoch = ckpt["iteration"] + 1
            for reason in unreadable:
                say(f"warning: skipping a newer checkpoint: {reason}")
            say(f"resuming from {path} after epoch {start_epoch}")

    loader = DataLoader(
        SeededAugment(train_set, finetune_transform(side, settings.min_scale), labelled=True),
        batch_sampler=StepSampler(
            len(train_set), settings.batch_size, settings.seed, start_step=start_epoch * steps_per_epoch
        ),
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
    )
    total = settings.epochs * steps_per_epoch
    start_step = start_epoch * steps_per_epoch
    progress = Progress(total, start_step, enabled=not quiet and progress_enabled())
    amp = device.type == "cuda"
    losses: list[float] = []
    val_skipped: set = set()
    try:
        for step, (batch, bad) in zip(range(start_step, total), loader, strict=False):
            skipped_train.update(dict.fromkeys(bad))
            lr = lrs[step]
            if batch is not None:
                x, y, _ = batch
                apply_optim_scheduler(optimizer, lr, settings.weight_decay, lr)
                seed_step(settings.seed, step, 0)  # stochastic depth draws the same after a resume
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = F.cross_entropy(model(x.to(device)), y.to(device))
                if not torch.isfinite(loss):
                    raise DinoforgeError(f"non-finite loss at step {step}; try a lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            progress.update(f"loss {np.mean(losses[-20:]) if losses else float('nan'):.3f} lr {lr:.2e}")
            if (step + 1) % steps_per_epoch:
                continue
            epoch = step // steps_per_epoch
            top1, val_skipped = evaluate_top1(model, val_set, eval_batch_size, device)
            model.train()
            history.append(
                {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None, "lr": lr,
                 "val_top1": top1, "seconds": time.perf_counter() - t0}
            )  # fmt: skip
            losses = []
            payload = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "history": history, "skipped": list(skipped_train), "settings": asdict(settings), "record": record,
                "arch": backbone.arch, "classes": classes,
            }  # fmt: skip
            save_checkpoint(ckpt_dir, epoch, payload, keep=2)
            say(f"epoch {epoch + 1}/{settings.epochs}: val top1 {top1:.2f}")
            metrics = _metrics(history, settings, record, train_data, val_data, classes, num_classes)
            write_json(out / "metrics.json", metrics)
    finally:
        progress.close()
    if start_epoch >= settings.epochs:  # a resume of a finished run: nothing trained
        val_skipped = evaluate_top1(model, val_set, eval_batch_size, device)[1]
    save_backbone(model.backbone, out / "backbone.safetensors")
    save_head(model, classes, out / "head.safetensors")
    names = [train_set.item_name(i) for i in skipped_train] + [val_set.item_name(i) for i in sorted(val_skipped)]
    metrics = {
        **_metrics(history, settings, record, train_data, val_data, classes, num_classes),
        "num_train_images": len(train_set),
        "num_val_images": len(val_set),
        "backbone": str(out / "backbone.safetensors"),
        "head": str(out / "head.safetensors"),
        **skipped_summary(names),
        "wall_time_s": time.perf_counter() - t0,  # of this process (a resumed run: since the resume)
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def _metrics(history, settings, record, train_data, val_data, classes, num_classes) -> dict[str, Any]:
    return {
        "top1": history[-1]["val_top1"],
        "top1_per_epoch": [h["val_top1"] for h in history],
        "epochs": history,
        "settings": asdict(settings),
        "model": record,
        "train_data": train_data,
        "val_data": val_data,
        "num_classes": num_classes,
        "classes": classes,
    }


def _check_same_run(ckpt: dict, settings: FinetuneSettings, record: dict, path: Path) -> None:
    """A resume continues the run it finds: the same settings and backbone options, or one error line."""
    old = {**ckpt["settings"], **ckpt["record"]}
    new = {**asdict(settings), **record}
    diff = [f"{k}={old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        raise DinoforgeError(
            f"cannot resume {path}: it was run with {', '.join(diff)}; use the same options, or another --out"
        )

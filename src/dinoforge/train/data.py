"""Deterministic, resumable SSL data pipeline: step-indexed sharded sampling and per-sample seeded augmentation."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset, Sampler

from dinoforge.data.augment import DataAugmentationDINO
from dinoforge.data.batch_augment import BatchAugmentationDINO, to_uint8_tensor
from dinoforge.data.collate import collate_data_and_cast, mask_and_cast
from dinoforge.data.masking import MaskingGenerator
from dinoforge.train.highres import CropPhase, crop_phases
from dinoforge.utils import DinoforgeError


def _mix(*ints: int) -> int:
    """A 63-bit seed from several integers (stable across runs and processes)."""
    return int(np.random.SeedSequence([int(i) & 0xFFFFFFFF for i in ints]).generate_state(2, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's default CPU generator (called per sample, so kept cheap)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global RNGs from (seed, step, rank) before a training step, so the model's own randomness
    (stochastic depth) does not depend on what ran before in this process (data-loading workers' base seed, a
    resume): a resumed run draws what an uninterrupted one did."""
    seed_everything(_mix(seed, step, rank, 1))


class StepSampler(Sampler):
    """Yields, for global step s onwards, this rank's slice of the step's global batch as (index, seed) keys.

    Epoch e is a permutation seeded by (seed, e); each step takes the next `batch_size * world` positions (the last
    partial batch of an epoch is dropped). Starting at `start_step` reproduces exactly what an uninterrupted run sees.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0):
        self.n, self.bs, self.seed, self.rank, self.world, self.start_step = (
            n,
            batch_size,
            seed,
            rank,
            world,
            start_step,
        )
        self.steps_per_epoch = n // (batch_size * world)
        if self.steps_per_epoch == 0:
            raise DinoforgeError(f"dataset has {n} images, fewer than one global batch ({batch_size * world})")

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_mix(self.seed, epoch)).permutation(self.n)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        epoch, perm = -1, None
        while True:
            e, s = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            start = s * self.bs * self.world + self.rank * self.bs
            idx = perm[start : start + self.bs]
            yield [(int(i), _mix(self.seed, step, start + j)) for j, i in enumerate(idx)]
            step += 1


class SeededAugment(Dataset):
    """Applies the per-sample transform (the multi-crop augmentation, or just the uint8 conversion when the
    augmentation is batched in `SeededCollate`) with the RNGs seeded per (step, position): resumable and
    worker-independent.

    Items of the base dataset are (image, label, index) or None for a corrupt image, passed on as (None, index).
    With `labelled` (fine-tuning), items come out as (transformed image, label, index), and (None, -1, index).
    """

    def __init__(self, base: Dataset, transform: Callable, labelled: bool = False):
        self.base, self.transform, self.labelled = base, transform, labelled

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        item = self.base[index]
        if item is None:
            return (None, -1, index) if self.labelled else (None, index)
        seed_everything(seed)
        image = self.transform(item[0])
        return (image, item[1], index) if self.labelled else (image, seed)


class SeededCollate:
    """Drops the samples of unreadable images ((None, dataset index)), lists their indices under "skipped", seeds the
    mask RNGs from the batch, and calls the masking collate.

    Without `augment`, samples are augmented crops and `collate(samples)` stacks and masks them. With `augment` (a
    `BatchAugmentationDINO`), samples are uint8 images, augmented here as one batch with a generator per image seeded
    by its (seed, step, position) key, so its crops do not depend on the batch or rank it lands in; then
    `collate(global_crops, local_crops)` masks them. When that augmentation runs on a device (`augment.device`), the
    loader's call only gathers the uint8 images ({"samples", "skipped"}: loader workers never touch the GPU) and
    `finish` augments and masks them in the training process.
    """

    def __init__(self, collate: Callable, augment: Callable | None = None):
        self.collate, self.augment = collate, augment
        self.deferred = getattr(augment, "device", None) is not None

    def __call__(self, samples: list) -> dict:
        batch = {
            "samples": [s for s in samples if s[0] is not None],
            "skipped": [index for image, index in samples if image is None],
        }
        return batch if self.deferred else self.finish(batch)

    def finish(self, batch: dict) -> dict:
        """The collated batch of what `__call__` gathered (a batch already collated is returned as it is)."""
        if "samples" not in batch:
            return batch
        kept, skipped = batch["samples"], batch["skipped"]
        if not kept:
            return {"skipped": skipped}
        seed_everything(_mix(kept[0][1], len(kept)))
        if self.augment is None:
            out = self.collate([(crops, ()) for crops, _ in kept])
        else:
            generators = [torch.Generator().manual_seed(seed) for _, seed in kept]
            out = self.collate(*self.augment([image for image, _ in kept], generators))
        return out | {"skipped": skipped}


def crops_and_masks(
    cfg: DictConfig, phase: CropPhase | None = None, device: torch.device | None = None
) -> tuple[Callable, SeededCollate]:
    """The per-sample transform and the collate that turn images into a training batch (multi-crops and iBOT masks)
    at the crop sizes of `phase` (default: the base sizes): the one builder of what the step sees, for the loop and
    every benchmark. With crops.augment_on_device the batch is finished on `device` by `collate.finish`."""
    phase = phase or crop_phases(cfg)[0]
    g, p = phase.global_size, cfg.student.patch_size
    n_tokens = (g // p) ** 2
    augment_args = (
        tuple(cfg.crops.global_crops_scale),
        tuple(cfg.crops.local_crops_scale),
        cfg.crops.local_crops_number,
        g,
        phase.local_size,
        cfg.crops.official_blur,
        phase.blur_sigma_scale,
    )
    masking = {
        "mask_ratio_tuple": tuple(cfg.ibot.mask_ratio_min_max),
        "mask_probability": cfg.ibot.mask_sample_probability,
        "n_tokens": n_tokens,
        "mask_generator": MaskingGenerator(input_size=(g // p, g // p), max_num_patches=0.5 * n_tokens),
        "dtype": torch.float32,
    }
    if cfg.crops.batched_augmentation:  # per sample only uint8 tensors; the augmentation runs on the whole batch
        on_device = device if cfg.crops.augment_on_device else None
        augment = BatchAugmentationDINO(*augment_args, on_device)
        return to_uint8_tensor, SeededCollate(partial(mask_and_cast, **masking), augment)
    if cfg.crops.augment_on_device:
        raise DinoforgeError("crops.augment_on_device needs crops.batched_augmentation=true")
    return DataAugmentationDINO(*augment_args), SeededCollate(partial(collate_data_and_cast, **masking))

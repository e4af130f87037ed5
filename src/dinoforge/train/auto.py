"""`train --data FOLDER` with no `-c`: a recipe chosen from the images and the machine, and `--time` budgets.

The choice is a small table of rules (image count and size, CPU cores or GPU memory); it returns config overrides
and a reason for each, which the run prints and saves in config.yaml (`train.auto_choice`). A time budget is met by
timing a short probe run of the same config and setting `train.max_iterations`, so every schedule (lr, weight
decay, EMA, teacher temperature, the small recipe's derived values) is fitted to the steps that fill the budget.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dinoforge import distributed as dist_utils
from dinoforge.config.config import load_config
from dinoforge.data.datasets import build_dataset
from dinoforge.models.hub import find_hub_weights
from dinoforge.utils import DinoforgeError

SAMPLED_IMAGES = 64  # images opened to measure size and colour
CPU_SAMPLES = 40_000  # images a run sees without --time on a CPU (the demo's 4 × 10k: minutes on 2 cores)
GPU_SAMPLES = 2_000_000  # the same on a GPU (a ViT-S/14 at 224 px: about half an hour on one H100)
PROBE_PERIOD, PROBE_WARM, PROBE_TIMED = 2, 1, 2  # probe: a stamp every 2 steps; 1 period warms up, 2 are timed
MARGIN = 0.05  # of the budget, kept free for the clock's spread between probe and run


@dataclass(frozen=True)
class DataFacts:
    """What the choice needs to know about the images."""

    n_images: int
    side: int  # median shorter side, px, of the sampled images
    grey: bool  # every sampled image has R = G = B


@dataclass(frozen=True)
class Machine:
    """What the choice needs to know about the machine: CPU cores, or the first GPU and its memory."""

    cores: int
    gpu: str | None = None
    gpu_memory_gib: float = 0.0


@dataclass
class Choice:
    """A preset, the overrides applied on it (before the user's key=value) and one reason per line."""

    preset: str
    overrides: dict[str, object] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def set(self, reason: str, **keys: object) -> None:
        self.overrides.update({k.replace("__", "."): v for k, v in keys.items()})
        self.reasons.append(reason)


def look_at_data(data: str) -> DataFacts:
    """Count the images of a data spec and measure the size and colour of up to SAMPLED_IMAGES of them."""
    dataset = build_dataset(data, transform=None, split="train")
    n = len(dataset)
    if n == 0:
        raise DinoforgeError(f"no images found in {data}")
    sides, grey = [], True
    for i in range(0, n, max(1, n // SAMPLED_IMAGES)):
        item = dataset[i]
        if item is None:
            continue
        img = item[0]
        sides.append(min(img.size))
        r, g, b = img.convert("RGB").split()
        grey = grey and r.tobytes() == g.tobytes() == b.tobytes()
    if not sides:
        raise DinoforgeError(f"none of the sampled images of {data} could be read")
    return DataFacts(n, int(statistics.median(sides)), grey)


def this_machine() -> Machine:
    """CPU cores this process may use, and the first CUDA device with its memory when there is one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not torch.cuda.is_available():
        return Machine(cores)
    props = torch.cuda.get_device_properties(0)
    return Machine(cores, props.name, props.total_memory / 2**30)


def _power_of_two_batch(n_images: int, cap: int) -> int:
    """The largest power of two ≤ cap that still gives 8 steps per epoch (at least 16, or every image if fewer)."""
    return min(n_images, max(16, min(cap, 2 ** int(math.log2(max(n_images // 8, 16))))))


def choose(facts: DataFacts, machine: Machine) -> Choice:
    """The rule table: the model, crops, batch and recipe for these images on this machine."""
    small_images = facts.side <= 48
    if machine.gpu is None:
        choice = Choice("demo")
        where = f"CPU, {machine.cores} cores"
        if small_images:
            choice.set(f"images of {facts.side} px ({where}): the demo's 24/12 px crops, patch 4")
        else:
            choice.set(
                f"images of {facts.side} px ({where}): 64/32 px crops, patch 8 (8x8 tokens a crop)",
                crops__global_crops_size=64, crops__local_crops_size=32, student__patch_size=8,
            )  # fmt: skip
        if machine.cores > 4:
            choice.set(
                f"{machine.cores} cores: ViT of width 192, depth 6", student__embed_dim=192, student__depth=6,
                student__num_heads=3,
            )  # fmt: skip
        else:
            choice.set(f"{machine.cores} cores: the demo's ViT of width 128, depth 4")
        batch = _power_of_two_batch(facts.n_images, 128)
        samples = CPU_SAMPLES
    else:
        where = f"{machine.gpu}, {machine.gpu_memory_gib:.0f} GiB"
        if small_images:
            choice = Choice("demo")
            choice.set(
                f"images of {facts.side} px ({where}): 24/12 px crops, patch 4, ViT-S width 384, depth 12",
                student__embed_dim=384, student__depth=12, student__num_heads=6,
            )  # fmt: skip
        else:
            choice = Choice("vits14")
            choice.set(
                f"images of {facts.side} px ({where}): ViT-S/14 on 224/98 px crops (preset vits14)",
                train__num_workers=min(10, machine.cores), crops__batched_augmentation=True, optim__warmup_epochs=0,
                optim__freeze_last_layer_epochs=0,
            )  # fmt: skip
            try:
                weights = find_hub_weights("dinov2_vits14")
                choice.set(
                    f"released ViT-S/14 weights found: starting from {weights}",
                    student__pretrained_weights=str(weights),
                )
            except DinoforgeError:
                choice.reasons.append("no released ViT-S/14 weights in the torch.hub or HF cache: random init")
        batch = _power_of_two_batch(facts.n_images, 128 if machine.gpu_memory_gib >= 40 else 64)
        samples = GPU_SAMPLES
    steps = max(1, samples // batch)
    choice.set(
        f"{facts.n_images} images: batch {batch}, {steps} steps ({samples // 1000}k samples) unless --time says "
        f"otherwise; train.recipe=small (schedules, EMA, prototypes from the run)",
        train__batch_size_per_gpu=batch, train__max_iterations=steps, train__recipe="small",
        evaluation__eval_period_iterations=max(1, steps // 4),
    )  # fmt: skip
    if facts.grey:
        choice.reasons.append("grey images: read as RGB; the colour jitter changes only their brightness and contrast")
    return choice


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h' or plain seconds → seconds; a one-line error otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise DinoforgeError(f"--time must be a positive duration such as 600s, 10m or 1.5h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _given(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def _set(cfg: DictConfig, key: str, value: object) -> None:
    OmegaConf.set_struct(cfg, False)
    OmegaConf.update(cfg, key, value)
    OmegaConf.set_struct(cfg, True)


def probe_step(cfg: DictConfig, data: str) -> tuple[float, float]:
    """(seconds per step, seconds outside the steps: start-up and the end's export) of `cfg` on `data`, timed on
    a short run in a temporary folder."""
    from dinoforge.train.loop import train

    probe = cfg.copy()
    steps = PROBE_PERIOD * (PROBE_WARM + PROBE_TIMED) + 1
    for key, value in {
        "train.max_iterations": steps,
        "evaluation.eval_period_iterations": PROBE_PERIOD,
        "train.checkpoint_period_iterations": steps,
        "train.keep_checkpoints": 1,
    }.items():
        _set(probe, key, value)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(probe, Path(tmp), data=data, quiet=True, evaluate=lambda _: stamps.append(time.perf_counter()) or {})
        total = time.perf_counter() - t0
    step_s = (stamps[PROBE_WARM + PROBE_TIMED - 1] - stamps[PROBE_WARM - 1]) / (PROBE_PERIOD * PROBE_TIMED)
    return dist_utils.broadcast_object((step_s, max(total - steps * step_s, 0.0)))


def configure(
    config: str | None, data: str | None, overrides: list[str], budget_s: float | None, say=print
) -> DictConfig:
    """The run's config: `config` (a file or preset), or with none the rule table's choice for `data` and this
    machine; then the user's key=value; then, with a time budget, `train.max_iterations` fitted to it by a probe."""
    t_start = time.perf_counter()
    reasons: list[str] = []
    if config is None:
        load_config(None, overrides)  # a bad key=value fails before the images are opened
        data = data or str(load_config().train.dataset_path)
        choice = choose(look_at_data(data), this_machine())
        cfg = load_config(choice.preset, [*[f"{k}={v}" for k, v in choice.overrides.items()], *overrides])
        reasons = [f"auto (no -c): preset {choice.preset}", *choice.reasons]
    else:
        cfg = load_config(config, overrides)
    if budget_s is not None:
        if _given(overrides, "train.max_iterations"):
            reasons.append("--time ignored: train.max_iterations is given")
        else:
            step_s, outside_s = probe_step(cfg, data or cfg.train.dataset_path)
            left = budget_s * (1 - MARGIN) - (time.perf_counter() - t_start) - outside_s
            steps = int(left / step_s)
            if steps < 10:
                raise DinoforgeError(
                    f"--time {budget_s:.0f}s is too short: a step takes {step_s:.2f} s and start-up and export "
                    f"{outside_s:.0f} s here (at least 10 steps needed)"
                )
            _set(cfg, "train.max_iterations", steps)
            if not _given(overrides, "evaluation.eval_period_iterations"):
                _set(cfg, "evaluation.eval_period_iterations", max(1, steps // 4))
            reasons.append(
                f"--time {budget_s:.0f}s: a probe measured {step_s:.3f} s/step and {outside_s:.0f} s of start-up "
                f"and export: {steps} steps"
            )
    for line in reasons:
        say(f"[train] {line}")
    if reasons:
        _set(cfg, "train.auto_choice", reasons)
    return cfg

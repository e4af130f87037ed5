"""Images/s of the demo's multi-crop data path, batched (BatchAugmentationDINO) vs PIL per sample (the peer,
DataAugmentationDINO), against the demo training step's images/s measured in the same run.

The data path is what the training loader does for one batch of the `demo` preset (128 bundled images, 2×24 px +
4×12 px crops): read the images, the per-sample transform, the collate (where the batched augmentation runs) and the
iBOT masks, with the package's `train.data.crops_and_masks` and sampler, at 1 thread (as in a DataLoader worker) and
at torch's default threads. The step is the harness's DinoforgeStep (`train.step.TrainStep`, the step `dinoforge
train` runs) on the demo config and batches of the batched data path, at the same thread counts. Rounds alternate all
measurements, so background load hits them alike. Prints one JSON line per measurement, then the ratios: batched ÷
PIL, and data path ÷ step (target ≥ 3) for the demo's set-up (data at 1 thread in its loader worker, step at default
threads) and at equal thread counts.

    .venv/bin/python benchmarks/augment.py [--rounds 3] [--batches 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from harness import DinoforgeStep, emit, save

from dinoforge.config.config import load_config
from dinoforge.data.datasets import build_dataset
from dinoforge.train.data import SeededAugment, StepSampler, crops_and_masks

IMPLS = {"pil": "false", "batched": "true"}  # crops.batched_augmentation


def _data_path(impl: str):
    """The demo's training dataset, collate and batch sampler, for `impl` (PIL or batched augmentation)."""
    cfg = load_config("demo", [f"crops.batched_augmentation={IMPLS[impl]}", "train.num_workers=0"])
    transform, collate = crops_and_masks(cfg)
    images = build_dataset("bundled:train", split="train")
    sampler = StepSampler(len(images), cfg.train.batch_size_per_gpu, cfg.train.seed)
    return cfg, SeededAugment(images, transform), collate, iter(sampler)


def _time_batch(dataset, collate, keys, threads: int) -> tuple[float, dict]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    batch = collate([dataset[k] for k in keys])
    return time.perf_counter() - t0, batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each times every measurement once")
    ap.add_argument("--batches", type=int, default=2, help="data-path batches per measurement and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps before the rounds")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/augment"), help="folder for results.json")
    args = ap.parse_args()

    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads})
    paths = {impl: _data_path(impl) for impl in IMPLS}
    cfg = paths["batched"][0]
    batch_size = int(cfg.train.batch_size_per_gpu)
    data_times: dict[tuple[str, int], list[float]] = {(impl, t): [] for impl in IMPLS for t in thread_counts}
    step_times: dict[int, list[float]] = {t: [] for t in thread_counts}

    torch.manual_seed(0)
    step = DinoforgeStep(cfg, torch.device("cpu"))
    _, dataset, collate, sampler = paths["batched"]
    batch = _time_batch(dataset, collate, next(sampler), default_threads)[1]
    for _ in range(args.warmup):
        step(batch)
    for _ in range(args.rounds):
        for (impl, threads), seconds in data_times.items():
            _, dataset, collate, sampler = paths[impl]
            for _ in range(args.batches):
                dt, collated = _time_batch(dataset, collate, next(sampler), threads)
                seconds.append(dt)
                if impl == "batched":
                    batch = collated
        for threads, seconds in step_times.items():
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            step(batch)
            seconds.append(time.perf_counter() - t0)

    crops = f"2x{cfg.crops.global_crops_size}+{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}"
    common = {"preset": "demo", "batch": batch_size, "crops": crops, "device": "cpu"}

    def speed(seconds: list[float]) -> dict[str, float]:
        return {
            "img_per_s": batch_size * len(seconds) / sum(seconds),
            "img_per_s_median": batch_size / statistics.median(seconds),
        }

    results = [
        {"measure": "data_path", "impl": impl, "threads": t, **common, "batches": len(s), **speed(s)}
        for (impl, t), s in data_times.items()
    ]
    results += [
        {"measure": "train_step", "impl": "dinoforge", "threads": t, **common, "steps": len(s), **speed(s)}
        for t, s in step_times.items()
    ]
    for r in results:
        emit(r)

    data = {(r["impl"], r["threads"]): r["img_per_s"] for r in results if r["measure"] == "data_path"}
    steps = {r["threads"]: r["img_per_s"] for r in results if r["measure"] == "train_step"}
    ratios = [
        {"ratio": "batched/pil data_path img_per_s", "threads": t, "value": data["batched", t] / data["pil", t]}
        for t in thread_counts
    ]
    # the demo's set-up: the loader worker runs at 1 thread, the step at default threads; then both at t threads
    pairs = dict.fromkeys([(1, default_threads), *((t, t) for t in thread_counts)])
    ratios += [
        {
            "ratio": "data_path/train_step img_per_s",
            "impl": impl,
            "data_threads": td,
            "step_threads": ts,
            "value": data[impl, td] / steps[ts],
            "target": 3.0,
        }
        for impl in IMPLS
        for td, ts in pairs
    ]
    for line in ratios:
        emit(line)
    save(args.out, results, ratios)


if __name__ == "__main__":
    main()

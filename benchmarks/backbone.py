"""Backbone throughput: dinoforge vs the official dinov2 code, same weights, fp32 CPU, batch 16 at 224.

Prints one JSON line per measurement (images/s and peak memory per implementation, then the ratio).
Timing alternates the two implementations run by run and reports medians, so background load hits
both alike. Peak memory is the extra resident-set high-water mark of one forward pass, measured
in a fresh subprocess per implementation (RSS sampled every millisecond, above the loaded model).

    .venv/bin/python benchmarks/backbone.py [--models vit_small vit_base] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

import torch


def build(impl: str, arch: str, seed: int = 0) -> torch.nn.Module:
    """The named architecture (patch 14, 518 px, LayerScale) from one implementation, seeded weights."""
    from dinoforge.models import vision_transformer as ours

    torch.manual_seed(seed)
    model = getattr(ours, arch)(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    if impl == "official":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dinov2.models import vision_transformer as off
        ref = getattr(off, arch)(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
        ref.load_state_dict(model.state_dict(), strict=True)
        model = ref
    return model.eval()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_mb(impl: str, arch: str, batch: int, size: int) -> float:
    """Peak RSS above the loaded model (MiB) during one forward pass, sampled every millisecond."""
    model = build(impl, arch)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x[:1])  # allocator and kernel warm-up
    before, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with torch.inference_mode():
        model(x)
    done.set()
    sampler.join()
    return max(peak[0] - before, 0) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_small", "vit_base"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--memory-of", nargs=2, metavar=("IMPL", "ARCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        print(peak_memory_mb(*args.memory_of, args.batch, args.size))
        return
    x = torch.randn(args.batch, 3, args.size, args.size)
    for arch in args.models:
        models = {impl: build(impl, arch) for impl in ("dinoforge", "official")}
        with torch.inference_mode():
            diff = (models["dinoforge"](x[:2]) - models["official"](x[:2])).abs().max().item()
            for m in models.values():
                m(x)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(args.runs):
                for impl, m in models.items():
                    t0 = time.perf_counter()
                    m(x)
                    times[impl].append(time.perf_counter() - t0)
        speed = {}
        for impl in models:
            speed[impl] = args.batch / statistics.median(times[impl])
            cmd = [sys.executable, __file__, "--memory-of", impl, arch, "--batch", str(args.batch),
                   "--size", str(args.size)]  # fmt: skip
            mem = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
            line = dict(bench="backbone", model=arch, impl=impl, batch=args.batch, img_size=args.size,
                        dtype="float32", device="cpu", threads=torch.get_num_threads(),
                        images_per_s=round(speed[impl], 2), peak_mem_mb=round(mem, 1))  # fmt: skip
            print(json.dumps(line), flush=True)
        ratio = speed["dinoforge"] / speed["official"]
        print(json.dumps(dict(bench="backbone", model=arch, metric="speed_ratio_dinoforge_over_official",
                              ratio=round(ratio, 3), max_abs_diff_cls=diff)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

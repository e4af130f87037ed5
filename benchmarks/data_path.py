"""The data path at the official crops (2×224 + 8×96 px): images/s per core of the PIL multi-crop path (what the
official recipe runs in loader workers) against the batched path (batch_augment.py), both from real-size JPEGs
generated on the fly, and the cores one GPU's training step would need; with --loaders, the shard loader against
the folder loader of the same JPEGs (decode to uint8 tensors in loader workers), same run.

    python benchmarks/data_path.py                          # per-core rates and cores per GPU, one thread
    python benchmarks/data_path.py --step-images-per-s 400  # cores for a step that eats 400 images/s
    python benchmarks/data_path.py --loaders --workers 2    # shards vs folder, images/s (ratio)
    python benchmarks/data_path.py --device cuda            # + the batched augmentation on the GPU, JPEG decode on GPU
    python benchmarks/data_path.py --startup --shards 10000 # time to the first batch from 100M samples, 1 and 8 ranks
    python benchmarks/data_path.py --vs-wids --shards 200 --per-shard 1000  # random shard reads against wids

Prints one JSON line per measurement; each names its peer and the ratio. Rounds alternate the peers, and the
best round of each counts (the least disturbed by other work on a shared machine).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinoforge.data.augment import DataAugmentationDINO
from dinoforge.data.batch_augment import BatchAugmentationDINO, decode_jpegs, to_uint8_tensor
from dinoforge.data.datasets import build_dataset, decode_image, load_sample_photos
from dinoforge.data.pack import pack_shards
from dinoforge.utils import DinoforgeError

# The training step the data path must keep up with, by default: ViT-L/14 at the official crops is about 2 TFLOP per
# image (student forward + backward on 2×224 + 8×98 px, teacher forward on 2×224); at 40 % of an H200's dense bf16
# peak (989 TFLOP/s, gpu_check.PEAK_BF16) that is ~200 images/s per GPU. gpu_check measures the real figure.
DEFAULT_STEP_IMAGES_PER_S = 200.0
OFFICIAL = dict(global_crops_size=224, local_crops_size=96, local_crops_number=8)
JPEG_SIZE = (500, 375)  # ImageNet's typical image (width, height)


def make_jpegs(n: int, size: tuple[int, int] = JPEG_SIZE, seed: int = 0, quality: int = 90) -> list[bytes]:
    """n JPEG files' bytes of `size` px: random crops of scikit-image's colour photos, resized (photo content, so
    decode and crop costs are a real JPEG's, unlike noise or flat images)."""
    photos = list(load_sample_photos().values())
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _best_rate(fn: Callable[[], int], rounds: int) -> float:
    """Images/s of the fastest of `rounds` calls of fn (which returns how many images it did)."""
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def pil_path(jpegs: list[bytes], crops: dict) -> Callable[[], int]:
    """Decode + the PIL multi-crop augmentation, image by image (the official loader workers' work)."""
    augment = DataAugmentationDINO(**crops)

    def run() -> int:
        for i, data in enumerate(jpegs):
            augment(decode_image(data, str(i)))
        return len(jpegs)

    return run


def batched_path(jpegs: list[bytes], crops: dict, batch: int, device: str, gpu_decode: bool) -> Callable[[], int]:
    """Decode (PIL on the CPU, or nvJPEG with `gpu_decode`) + the batched multi-crop augmentation on `device`."""
    augment = BatchAugmentationDINO(**crops, device=device)

    def run() -> int:
        for start in range(0, len(jpegs), batch):
            chunk = jpegs[start : start + batch]
            if gpu_decode:
                images = decode_jpegs(chunk, device)
            else:
                images = [to_uint8_tensor(decode_image(d, str(i))) for i, d in enumerate(chunk)]
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
            augment(images, generators)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return len(jpegs)

    return run


def decode_only(jpegs: list[bytes]) -> Callable[[], int]:
    """PIL decode to uint8 tensors: what a loader core does when the augmentation runs on the GPU."""

    def run() -> int:
        for i, data in enumerate(jpegs):
            to_uint8_tensor(decode_image(data, str(i)))
        return len(jpegs)

    return run


def _line(record: dict) -> dict:
    print(json.dumps(record), flush=True)
    return record


def per_core(args: argparse.Namespace, crops: dict) -> list[dict]:
    """Images/s per core (one thread, one process) of each path, and the cores per GPU at the step's rate."""
    torch.set_num_threads(1)
    jpegs = make_jpegs(args.images, tuple(args.jpeg_size), seed=1)
    paths = {
        "pil": pil_path(jpegs, crops),
        "batched": batched_path(jpegs, crops, args.batch, "cpu", gpu_decode=False),
        "decode_only": decode_only(jpegs),
    }
    for run in paths.values():  # warm-up (first-call allocations, lazy imports)
        run()
    rates = {name: 0.0 for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            rates[name] = max(rates[name], _best_rate(run, 1))
    step = args.step_images_per_s
    shown = f"2x{crops['global_crops_size']} + {crops['local_crops_number']}x{crops['local_crops_size']}"
    out = []
    for name, rate in rates.items():
        out.append(
            _line(
                {
                    "measurement": "images_per_s_per_core",
                    "path": name,
                    "crops": shown,
                    "jpeg": f"{args.jpeg_size[0]}x{args.jpeg_size[1]}",
                    "images_per_s_per_core": round(rate, 2),
                    "peer": "pil",
                    "ratio_vs_peer": round(rate / rates["pil"], 3),
                    "step_images_per_s": step,
                    "cores_per_gpu": round(step / rate, 1),
                }
            )
        )
    return out


def on_device(args: argparse.Namespace, crops: dict) -> list[dict]:
    """The batched augmentation on the GPU (CPU decode, or nvJPEG decode) against the per-core CPU batched path."""
    jpegs = make_jpegs(args.images, tuple(args.jpeg_size), seed=2)
    paths = {
        "batched_on_gpu_cpu_decode": batched_path(jpegs, crops, args.batch, args.device, gpu_decode=False),
        "batched_on_gpu_gpu_decode": batched_path(jpegs, crops, args.batch, args.device, gpu_decode=True),
    }
    for run in paths.values():
        run()
    rates = {name: _best_rate(run, args.rounds) for name, run in paths.items()}
    return [
        _line(
            {
                "measurement": "images_per_s_on_device",
                "path": name,
                "device": torch.cuda.get_device_name(0),
                "images_per_s": round(rate, 1),
                "step_images_per_s": args.step_images_per_s,
                "vs_step": round(rate / args.step_images_per_s, 2),
            }
        )
        for name, rate in rates.items()
    ]


class Encoded(torch.utils.data.Dataset):
    """The encoded bytes of a folder's or shards' items: a file read (open, read, close) or one positioned read."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> bytes:
        read = getattr(self.dataset, "read_bytes", None)
        return read(index) if read else Path(self.dataset.paths[index]).read_bytes()


def loaders(args: argparse.Namespace) -> list[dict]:
    """The shard loader against the folder loader of the same JPEGs: DataLoader(s) with `workers` processes that
    read and decode to uint8 tensors (and, second, that only read the bytes), one epoch in a fixed shuffled order,
    best of the rounds; ratio shards/folder."""
    jpegs = make_jpegs(args.images, tuple(args.jpeg_size), seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        for i, data in enumerate(jpegs):
            (folder / f"{i:06d}.jpg").write_bytes(data)
        spec = pack_shards(build_dataset(folder), Path(tmp) / "shards", max_images=args.shard_images)["spec"]
        datasets = {
            ("decode", "folder"): build_dataset(folder, transform=to_uint8_tensor),
            ("decode", "shards"): build_dataset(spec, transform=to_uint8_tensor),
            ("read_only", "folder"): Encoded(build_dataset(folder)),
            ("read_only", "shards"): Encoded(build_dataset(spec)),
        }
        order = torch.randperm(len(jpegs), generator=torch.Generator().manual_seed(0)).tolist()

        def epoch(dataset) -> Callable[[], int]:
            loader = torch.utils.data.DataLoader(  # workers started once: an epoch times reading, not start-up
                dataset, batch_size=args.batch, sampler=order, num_workers=args.workers, collate_fn=list,
                persistent_workers=args.workers > 0,
            )  # fmt: skip

            def run() -> int:
                return sum(len(b) for b in loader)

            run()  # warm-up: workers started, page cache filled
            return run

        runs = {name: epoch(dataset) for name, dataset in datasets.items()}
        rates = {name: 0.0 for name in datasets}
        for _ in range(args.rounds):
            for name, run in runs.items():
                rates[name] = max(rates[name], _best_rate(run, 1))
    return [
        _line(
            {
                "measurement": "loader_images_per_s",
                "work": work,
                "images": len(jpegs),
                "workers": args.workers,
                "shard_images": args.shard_images,
                "shards_images_per_s": round(rates[work, "shards"], 1),
                "peer": "folder",
                "folder_images_per_s": round(rates[work, "folder"], 1),
                "ratio_vs_peer": round(rates[work, "shards"] / rates[work, "folder"], 3),
            }
        )
        for work in ("decode", "read_only")
    ]


def _tiny_tar(path: Path, members: int) -> None:
    """A shard of `members` samples, each a 1x1 PNG and a .cls label, written as raw tar blocks (fast: the start-up
    benchmark needs millions of index entries, not image data)."""
    import tarfile

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    png = buf.getvalue()
    out = bytearray()
    for i in range(members):
        for name, data in ((f"{i:09d}.png", png), (f"{i:09d}.cls", str(i % 1000).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out += info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)
    path.write_bytes(bytes(out + bytes(1024)))


def _first_batch(spec: str, batch: int, queue) -> None:
    """One rank's start-up: open the shards through their saved indexes and load the first batch (decoded); then,
    untimed, the peak of numpy and Python allocations while opening them again (tracemalloc), per sample."""
    import tracemalloc

    t = time.perf_counter()
    dataset = build_dataset(spec, transform=to_uint8_tensor)
    opened = time.perf_counter() - t
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=list)
    next(iter(loader))
    first = time.perf_counter() - t
    samples = len(dataset)
    del dataset, loader
    tracemalloc.start()
    kept = build_dataset(spec, transform=to_uint8_tensor)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    queue.put({"open_s": opened, "first_batch_s": first, "peak": peak, "kept": current, "samples": samples})


def startup(args: argparse.Namespace) -> list[dict]:
    """Time to the first batch from shards holding `shards x per_shard` samples, for 1 rank and for `ranks` ranks at
    once (processes started together, as torchrun's are), and the memory per sample. The shards are hard links of
    one tiny tar and their saved indexes copies of its index: start-up reads every index as it would at scale."""
    import multiprocessing as mp
    import os
    import shutil

    from dinoforge.data.shards import index_path, write_index

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        first = root / f"{0:06d}.tar"
        _tiny_tar(first, args.per_shard)
        t = time.perf_counter()
        write_index(first)
        index_s = time.perf_counter() - t
        for s in range(1, args.shards):
            os.link(first, root / f"{s:06d}.tar")
            shutil.copyfile(index_path(first), index_path(root / f"{s:06d}.tar"))
        spec = f"{root}/{{{0:06d}..{args.shards - 1:06d}}}.tar"
        ctx = mp.get_context("spawn")
        records = []
        for ranks in sorted({1, args.ranks}):
            queue = ctx.Queue()
            procs = [ctx.Process(target=_first_batch, args=(spec, args.batch, queue)) for _ in range(ranks)]
            for p in procs:
                p.start()
            got = [queue.get() for _ in procs]
            for p in procs:
                p.join()
            samples = got[0]["samples"]
            records.append(
                _line(
                    {
                        "measurement": "shards_start_up",
                        "ranks": ranks,
                        "shards": args.shards,
                        "samples": samples,
                        "open_s_max": round(max(g["open_s"] for g in got), 2),
                        "first_batch_s_max": round(max(g["first_batch_s"] for g in got), 2),
                        "bytes_per_sample_peak": round(max(g["peak"] for g in got) / samples, 1),
                        "bytes_per_sample_kept": round(max(g["kept"] for g in got) / samples, 1),
                        "index_build_us_per_sample_once": round(index_s / args.per_shard * 1e6, 1),
                        "peer": "none (the figure to meet: under 60 s per rank at 100M samples, 50 bytes a sample)",
                    }
                )
            )
    return records


def versus_wids(args: argparse.Namespace) -> list[dict]:
    """Random access (the training sampler's order) over `shards x per_shard` samples: ShardDataset's saved index and
    positioned reads against wids' ShardListDataset (webdataset's indexed reader: it scans a shard's headers when it
    opens it, and keeps `OPEN_SHARDS` shards open, as ours does), raw sample bytes, the same indices. wids is not a
    dependency: install it to run this (`pip install wids`)."""
    import wids

    from dinoforge.data.shards import OPEN_SHARDS, ShardDataset

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        files = [Path(tmp) / f"{s:06d}.tar" for s in range(args.shards)]
        for f in files:
            _tiny_tar(f, args.per_shard)
        t = time.perf_counter()
        ours = ShardDataset(files)
        index_s = time.perf_counter() - t
        theirs = wids.ShardListDataset(
            [{"url": str(f), "nsamples": args.per_shard} for f in files], transformations=[], lru_size=OPEN_SHARDS
        )
        order = np.random.default_rng(0).permutation(len(ours))[: args.images * 50].tolist()
        rates = {"ours": 0.0, "wids": 0.0}
        for _ in range(args.rounds):
            rates["ours"] = max(rates["ours"], _best_rate(lambda: sum(1 for i in order if ours.read_bytes(i)), 1))
            rates["wids"] = max(rates["wids"], _best_rate(lambda: sum(1 for i in order if theirs[i][".png"]), 1))
    return [
        _line(
            {
                "measurement": "shard_random_reads_per_s",
                "shards": args.shards,
                "samples": len(order),
                "ours_reads_per_s": round(rates["ours"], 1),
                "peer": "wids ShardListDataset",
                "wids_reads_per_s": round(rates["wids"], 1),
                "ratio_vs_peer": round(rates["ours"] / rates["wids"], 3),
                "our_index_build_s_once": round(index_s, 2),
            }
        )
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="JPEGs per round")
    ap.add_argument("--jpeg-size", type=int, nargs=2, default=list(JPEG_SIZE), metavar=("W", "H"))
    ap.add_argument("--batch", type=int, default=32, help="images per batch of the batched path and the loaders")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the best of each path counts")
    ap.add_argument(
        "--step-images-per-s",
        type=float,
        default=DEFAULT_STEP_IMAGES_PER_S,
        help="images/s one GPU's training step consumes (default: ViT-L/14 at 40%% of an H200's bf16 peak)",
    )
    ap.add_argument("--local-crops-size", type=int, default=OFFICIAL["local_crops_size"])
    ap.add_argument("--loaders", action="store_true", help="only the shard vs folder loader comparison")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes (--loaders)")
    ap.add_argument("--shard-images", type=int, default=1000, help="images per shard (--loaders)")
    ap.add_argument("--startup", action="store_true", help="only the shard start-up figure (saved index)")
    ap.add_argument("--vs-wids", action="store_true", help="only random shard reads against wids (pip install wids)")
    ap.add_argument("--shards", type=int, default=1000, help="shards (--startup)")
    ap.add_argument("--per-shard", type=int, default=10000, help="samples per shard (--startup)")
    ap.add_argument("--ranks", type=int, default=8, help="ranks starting at once (--startup)")
    ap.add_argument("--tmp", default=None, help="folder for the start-up shards (default: the system's temp)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda to add the on-GPU batched augmentation")
    ap.add_argument("--out", type=Path, help="also write the records to this JSON file")
    args = ap.parse_args()
    crops = OFFICIAL | {"local_crops_size": args.local_crops_size}
    if args.device != "cpu" and not torch.cuda.is_available():
        raise DinoforgeError(f"--device {args.device}: CUDA is not available")
    if args.startup:
        records = startup(args)
    elif args.vs_wids:
        records = versus_wids(args)
    elif args.loaders:
        records = loaders(args)
    else:
        records = per_core(args, crops)
        if args.device != "cpu":
            records += on_device(args, crops)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    try:
        main()
    except DinoforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

"""GPU check: the tests marked `gpu` on the device (backbone parity, bf16, exact resume, the benchmarks' step = the
loop's), the training step against lightly, training variants, a real `dinoforge train` run, and the data path
against the step, in one command of at most ~9 minutes; results in one JSON file and a printed table.

    python benchmarks/gpu_check.py            # --full when CUDA is present, else --smoke (and says so)
    python benchmarks/gpu_check.py --smoke    # tiny models, every code path, no meaningful timing (CPU)
    python benchmarks/gpu_check.py --full --sections tests,real_run

Each section runs in its own process under its own time budget and prints one JSON line per result; a failure or a
timeout is that section's status, what it printed is kept, and the next section runs. The JSON
(`benchmarks/results/gpu-<date>-<device>.json`, or --out) is rewritten after every section.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

import torch
from harness import BENCH_MODELS, Spec, dinoforge_cli, emit, has_lightly, measure_pair

HERE = Path(__file__).resolve().parent
# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, first match wins (NVIDIA data sheets, SXM parts).
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))
TARGET_SPEED, TARGET_MEMORY = 1.5, 0.6  # dinoforge vs lightly: images/s at least 1.5x, peak memory at most 0.6x
TARGET_DATA_PATH = 1.5  # the data path's images/s at least 1.5x the ViT-L/14 training step's
TINY = ["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "dino.head_n_prototypes=64",
        "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32"]  # fmt: skip

# What each mode runs. Budgets (seconds) sum to under 9 minutes on the full path.
PLAN: dict[str, dict[str, dict]] = {
    "full": {
        "tests": dict(budget=120, marker="gpu"),
        "train_step": dict(budget=170, models=["vits14_full", "vitb14_full", "vitl14_full"], steps=5, warmup=2),
        "variants": dict(budget=140, model="vits14_full", steps=4, warmup=2, compile="inductor"),
        "real_run": dict(budget=80, preset="vits14", steps=200, batch=32, images=512, image_size=160, workers=10),
        "data_path": dict(
            budget=60, images=512, jpeg_size=(500, 375), batch=64, workers=min(8, os.cpu_count() or 1), rounds=2,
            crops=dict(global_crops_size=224, local_crops_size=96, local_crops_number=8),
        ),
    },
    "smoke": {
        "tests": dict(budget=240, marker="gpu and not slow"),
        "train_step": dict(budget=90, models=["demo"], steps=1, warmup=0, batch=4),
        "variants": dict(budget=120, model="demo", steps=1, warmup=0, batch=4, compile="eager", together=True),
        "real_run": dict(budget=60, preset="demo", steps=4, batch=4, images=16, image_size=32, workers=0, extra=TINY),
        "data_path": dict(
            budget=60, images=8, jpeg_size=(64, 48), batch=4, workers=0, rounds=1,
            crops=dict(global_crops_size=32, local_crops_size=16, local_crops_number=2),
        ),
    },
}  # fmt: skip
SECTIONS = tuple(PLAN["full"])


def attempt(item: dict, fn: Callable[[], dict]) -> dict | None:
    """Run one measurement and print it (or its error) as a JSON line joined to `item`; returns it, or None."""
    t0 = time.perf_counter()
    try:
        got = fn()
    except Exception as e:  # printed, and the section goes on with its next item
        emit({**item, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)})
        return None
    emit({**item, **got, "seconds": time.perf_counter() - t0})
    return got


def device_info() -> dict:
    """The device, its bf16 peak and the software versions."""
    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        memory = torch.cuda.get_device_properties(0).total_memory / 1e9
        info.update(device=name, memory_gb=memory, peak_bf16_flops=next((v for k, v in PEAK_BF16 if k in name), None))
    else:
        info.update(device="cpu", memory_gb=None, peak_bf16_flops=None)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE)
    info["commit"] = commit.stdout.strip() or None
    return info


def run_tests(plan: dict, device: torch.device) -> None:
    """pytest on the tests marked `gpu`, on `device`: one line per test with its outcome and recorded figures."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", plan["marker"],
               f"--device={device}", f"--junitxml={xml}", "-o", "junit_family=xunit1", "tests"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
        if not xml.exists():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {proc.stdout[-500:]}")
        for case in ElementTree.parse(xml).iter("testcase"):
            failed = case.find("failure") if case.find("failure") is not None else case.find("error")
            outcome = "failed" if failed is not None else "skipped" if case.find("skipped") is not None else "passed"
            item = {"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome}
            item.update({p.get("name"): float(p.get("value")) for p in case.iter("property")})
            if failed is not None:
                item["error"] = (failed.get("message") or "")[:300]
            emit(item)


def _batch_for(model: str, plan: dict, device: torch.device) -> int:
    """The plan's batch, else the preset's (set for 80 GB) scaled to this GPU's memory, a power of two."""
    if "batch" in plan:
        return plan["batch"]
    scale = torch.cuda.get_device_properties(0).total_memory / 80e9
    return max(1, 2 ** round(math.log2(max(BENCH_MODELS[model][1] * scale, 1))))


def _spec(impl: str, model: str, batch: int, plan: dict, device: torch.device, **kw) -> Spec:
    threads = None if device.type == "cuda" else 1  # one thread for the smoke check's tiny CPU models
    return Spec(impl, model, batch, plan["steps"], plan["warmup"], str(device), threads, "auto", **kw)


def _memory(r: dict) -> float:
    return r["peak_cuda_mb"] if "peak_cuda_mb" in r else r["step_mem_mb"]


def run_train_step(plan: dict, device: torch.device) -> None:
    """dinoforge vs lightly, same model/crops/batch/masks, bf16 autocast on CUDA; halves the batch on failure."""
    peak, lightly = device_info()["peak_bf16_flops"], has_lightly()
    impls = ["dinoforge", "lightly"] if lightly else ["dinoforge"]
    if not lightly:
        missing = "lightly is not installed (pip install '.[bench]'; make gpu-check does)"
        emit({"model": "lightly", "error": missing} if device.type == "cuda" else {"meta": {"lightly": missing}})
    for model in plan["models"]:
        batch = _batch_for(model, plan, device)
        for _ in range(3):  # the batch, then half, then a quarter
            specs = [_spec(i, model, batch, plan, device, import_lightly=lightly, count_flops=True) for i in impls]

            def measure(specs: list = specs) -> dict:
                got = {r["impl"]: r for r in measure_pair(specs)}
                for r in got.values():  # MFU: counted FLOPs per second over the device's bf16 peak
                    if peak:
                        r["mfu"] = r["flops_per_step"] * r["img_per_s"] / r["batch"] / peak
                out: dict = {"measurements": got}
                if len(got) == 2:
                    d, lt = got["dinoforge"], got["lightly"]
                    speed, memory = d["img_per_s"] / lt["img_per_s"], _memory(d) / _memory(lt)
                    out.update(speed_ratio=speed, memory_ratio=memory, targets_met=speed >= TARGET_SPEED
                               and memory <= TARGET_MEMORY, memory_measure="peak_cuda_mb" if "peak_cuda_mb" in d
                               else "step_mem_mb")  # fmt: skip
                return out

            done = attempt({"model": model, "batch": batch}, measure) is not None
            if done or device.type != "cuda" or batch == 1:
                break
            batch //= 2  # most likely out of memory: the next try at half the batch


def run_variants(plan: dict, device: torch.device) -> None:
    """dinoforge alone under each variant, against its default step in the same run."""
    model, batch = plan["model"], _batch_for(plan["model"], plan, device)
    variants = {
        "default": ([], {}),
        "packed": (["train.sequence_packing=true"], {}),
        "unpacked": (["train.sequence_packing=false"], {}),
        "fsdp2_one_process": ([], {"fsdp": True}),
        "foreach_adamw": ([], {"fused": False}),
        "activation_checkpointing": (["train.activation_checkpointing=true"], {}),
        f"compile_{plan['compile']}": ([], {"compile": plan["compile"]}),
    }
    specs = {
        name: _spec("dinoforge", model, batch, plan, device, import_lightly=False, overrides=o, options=kw)
        for name, (o, kw) in variants.items()
    }
    if plan.get("together"):  # all workers at once: with tiny models, their start-up is the time
        together = dict(zip(specs, measure_pair(list(specs.values())), strict=True))
    base = None
    for name, spec in specs.items():

        def measure(name: str = name, spec: Spec = spec, base: dict | None = base) -> dict:
            r = together[name] if plan.get("together") else measure_pair([spec])[0]
            out = {k: r[k] for k in ("img_per_s", "step_ms_median", "precision")} | {"memory_mb": _memory(r)}
            if base is not None:
                out.update(speed_vs_default=r["img_per_s"] / base["img_per_s"],
                           memory_vs_default=out["memory_mb"] / base["memory_mb"])  # fmt: skip
            return out

        got = attempt({"variant": name, "model": model, "batch": batch, "overrides": spec.overrides}, measure)
        base = got if name == "default" else base


def run_real_run(plan: dict, device: torch.device) -> None:
    """`dinoforge train` for `steps` iterations on a generated image folder: images/s and its losses."""
    import numpy as np
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        images, run = Path(tmp) / "images", Path(tmp) / "run"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(plan["images"]):  # smooth random RGB images (upsampled noise), so crops differ in content
            small = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
            small.resize((plan["image_size"],) * 2, Image.BICUBIC).save(images / f"img_{i:05d}.png")
        overrides = [f"train.batch_size_per_gpu={plan['batch']}", f"train.max_iterations={plan['steps']}",
                     f"train.num_workers={plan['workers']}", "crops.batched_augmentation=true",
                     "evaluation.eval_period_iterations=0", *plan.get("extra", [])]  # fmt: skip

        def train() -> dict:
            dinoforge_cli("train", "-c", plan["preset"], "-d", str(images), "-o", str(run), *overrides)
            last = json.loads((run / "train_summary.json").read_text())["last"]
            with open(run / "metrics.csv") as f:
                losses = [float(r["total_loss"]) for r in csv.DictReader(f)]
            return {"preset": plan["preset"], "steps": plan["steps"], "batch": plan["batch"],
                    "images_per_s": last["images_per_s"], "step_images_per_s": last["step_images_per_s"],
                    "first_total_loss": losses[0], "final_total_loss": losses[-1]}  # fmt: skip

        attempt({"part": "train"}, train)


def run_data_path(plan: dict, device: torch.device) -> None:
    """Generated JPEGs packed into shards; loader workers read them (decoded to uint8 by PIL, or as bytes for nvJPEG)
    and the batched multi-crop augmentation runs on the device: images/s of each, best of the rounds."""
    import data_path

    from dinoforge.data.batch_augment import BatchAugmentationDINO, decode_jpegs, to_uint8_tensor
    from dinoforge.data.datasets import build_dataset
    from dinoforge.data.pack import pack_shards

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, data in enumerate(data_path.make_jpegs(plan["images"], plan["jpeg_size"])):
            (folder / f"{i:06d}.jpg").write_bytes(data)
        spec = pack_shards(build_dataset(folder), Path(tmp) / "shards", max_images=max(1, plan["images"] // 4))["spec"]
        augment = BatchAugmentationDINO(**plan["crops"], device=device)
        decoders = {  # what a loader worker returns per image, and how the batch becomes uint8 images on the device
            "pil_decode_in_workers": (to_uint8_tensor, lambda batch: batch),
            "decode_jpeg_on_device": (None, lambda batch: decode_jpegs(batch, device)),
        }
        for name, (transform, to_images) in decoders.items():
            dataset = build_dataset(spec, transform=transform)
            dataset = dataset if transform is not None else data_path.Encoded(dataset)

            def epoch(dataset=dataset, to_images=to_images) -> int:
                loader = torch.utils.data.DataLoader(dataset, batch_size=plan["batch"], num_workers=plan["workers"],
                                                     collate_fn=lambda b: [s[0] if isinstance(s, tuple) else s
                                                                           for s in b])  # fmt: skip
                n = 0
                for batch in loader:
                    augment(to_images(batch), [torch.Generator().manual_seed(n + i) for i in range(len(batch))])
                    n += len(batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return n

            def measure(epoch=epoch) -> dict:
                epoch()  # warm-up: workers' first imports, cuDNN/nvJPEG set-up
                rate = data_path._best_rate(epoch, plan["rounds"])
                return {"images_per_s": rate, "images": plan["images"], "workers": plan["workers"], **plan["crops"]}

            attempt({"path": name}, measure)


def data_path_vs_step(report: dict) -> dict | None:
    """The data path's best images/s over the training step's (ViT-L/14 when measured, else the last model)."""
    steps = [r for r in report["sections"].get("train_step", {}).get("results", []) if "error" not in r]
    paths = [r for r in report["sections"].get("data_path", {}).get("results", []) if "error" not in r]
    if not steps or not paths:
        return None
    step = next((r for r in steps if r["model"] == "vitl14_full"), steps[-1])
    step_rate = step["measurements"]["dinoforge"]["img_per_s"]
    best = max(paths, key=lambda r: r["images_per_s"])
    return {"model": step["model"], "step_images_per_s": step_rate, "data_path": best["path"],
            "data_path_images_per_s": best["images_per_s"], "ratio": best["images_per_s"] / step_rate,
            "target_met": best["images_per_s"] / step_rate >= TARGET_DATA_PATH}  # fmt: skip


RUNNERS: dict[str, Callable[[dict, torch.device], None]] = {
    "tests": run_tests,
    "train_step": run_train_step,
    "variants": run_variants,
    "real_run": run_real_run,
    "data_path": run_data_path,
}


def run_section(name: str, mode: str) -> dict:
    """One section in its own process group, killed at its budget; the JSON lines it printed are its results."""
    budget = PLAN[mode][name]["budget"]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--mode", mode]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        out = proc.communicate(timeout=budget)[0]
        status = "ok" if proc.returncode == 0 else f"error: exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        status = f"timeout after {budget} s"
    section: dict = {"results": []}
    for line in out.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            if "meta" in item:  # about the section, not a result
                section.update(item["meta"])
            else:
                section["results"].append(item)
    errors = [r for r in section["results"] if "error" in r]
    if status == "ok" and errors:
        status = f"error: {len(errors)} item(s) failed"
    return {"status": status, "seconds": time.perf_counter() - t0, "budget_s": budget, **section}


SHOWN = {  # the keys of each result the printed table shows
    "tests": ("test", "outcome", "fp32_max_abs_err", "bf16_rel_err"),
    "train_step": ("model", "batch", "speed_ratio", "memory_ratio"),
    "variants": ("variant", "img_per_s", "speed_vs_default", "memory_vs_default"),
    "real_run": ("preset", "steps", "images_per_s", "final_total_loss"),
    "data_path": ("path", "images_per_s"),
}


def print_table(report: dict) -> None:
    print(f"\nGPU check ({report['mode']}) on {report['env']['device']}, torch {report['env']['torch']}")
    for name, section in report["sections"].items():
        print(f"{name:<12} {section['status']} ({section['seconds']:.0f} s)")
        for r in section["results"]:
            shown = {k: f"{r[k]:.3g}" if isinstance(r[k], float) else r[k] for k in SHOWN[name] if k in r}
            print(f"{'':<12} {' '.join(f'{k}={v}' for k, v in shown.items())} {r.get('error', '')[:160]}")
        if section.get("vs_train_step"):
            print(f"{'':<12} vs_train_step {json.dumps(section['vs_train_step'], default=float)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the GPU check (needs CUDA)")
    mode.add_argument("--smoke", action="store_true", help="tiny models on CPU, every code path")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, help="result file (default benchmarks/results/gpu-<date>-<device>.json)")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=list(PLAN), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        if args.mode == "smoke":  # tiny models: one thread is fastest, and spares a shared machine
            torch.set_num_threads(1)
        RUNNERS[args.section](PLAN[args.mode][args.section], torch.device("cuda" if args.mode == "full" else "cpu"))
        return 0
    cuda = torch.cuda.is_available()
    if args.full and not cuda:
        print("error: --full needs a CUDA device; run --smoke (or no flag) here", file=sys.stderr)
        return 2
    run_mode = "full" if args.full or (cuda and not args.smoke) else "smoke"
    if run_mode == "smoke" and not args.smoke:
        print("no CUDA device: running the --smoke check (tiny models, every code path, no timing)", flush=True)
    names = [s for s in args.sections.split(",") if s]
    if unknown := sorted(set(names) - set(SECTIONS)):
        print(f"error: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    env = device_info()
    if args.out is None:
        slug = "cpu-smoke" if run_mode == "smoke" else env["device"].lower().replace("nvidia ", "").replace(" ", "-")
        args.out = HERE / "results" / f"gpu-{datetime.datetime.now(datetime.UTC):%Y-%m-%d}-{slug}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"mode": run_mode, "started": datetime.datetime.now(datetime.UTC).isoformat(), "env": env, "sections": {}}
    for name in names:
        print(f"[gpu-check] {name} (budget {PLAN[run_mode][name]['budget']} s)", flush=True)
        report["sections"][name] = run_section(name, run_mode)
        if name == "data_path":
            report["sections"][name]["vs_train_step"] = data_path_vs_step(report)
        args.out.write_text(json.dumps(report, indent=1, default=float))
    print_table(report)
    print(f"\nresults: {args.out}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

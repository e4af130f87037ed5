"""GPU check (issue 15): backbone parity on the device, the training step against lightly, training variants, a
short real run with resume, and the data path (shard loaders + the batched augmentation on the device, against the
training step's images/s), in one command of at most ~9 minutes, results in one JSON file and a printed table.

    python benchmarks/gpu_check.py            # --full when CUDA is present, else --smoke (and says so)
    python benchmarks/gpu_check.py --smoke    # tiny models, every code path, no meaningful timing (CPU, seconds)
    python benchmarks/gpu_check.py --full --sections parity,real_run

Each section runs in its own process under its own time budget; a failure or a timeout is recorded in the JSON as
that section's error and the next section still runs. The JSON (`benchmarks/results/gpu-<date>-<device>.json`,
or --out) is rewritten after every section, and each section's items are kept as they finish.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment, first match wins (NVIDIA data sheets, SXM parts).
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))
TARGET_SPEED, TARGET_MEMORY = 1.5, 0.6  # dinoforge vs lightly: images/s at least 1.5x, peak memory at most 0.6x
TARGET_DATA_PATH = 1.5  # the data path's images/s at least 1.5x the ViT-L/14 training step's
PARITY_TOL = 1e-4

# What each mode runs. Budgets (seconds) sum to under 9 minutes on the full path.
PLAN: dict[str, dict[str, dict]] = {
    "full": {
        "parity": dict(
            budget=70, models=["vit_small", "vit_large"], registers=[0, 4], batch=2,
            sizes=[(224, 224), (518, 518), (308, 434)],
        ),
        "train_step": dict(budget=170, models=["vits14_full", "vitb14_full", "vitl14_full"], steps=5, warmup=2),
        "variants": dict(budget=140, model="vits14_full", steps=4, warmup=2, compile="inductor"),
        "real_run": dict(
            budget=95, preset="vits14", steps=200, checkpoint=100, batch=32, images=512, image_size=160, workers=10,
        ),
        "data_path": dict(
            budget=60, images=512, jpeg_size=(500, 375), batch=64, workers=min(8, os.cpu_count() or 1), rounds=2,
            crops=dict(global_crops_size=224, local_crops_size=96, local_crops_number=8),
        ),
    },
    "smoke": {
        "parity": dict(budget=60, models=["tiny"], registers=[0, 4], batch=1, sizes=[(28, 28), (56, 56), (42, 70)]),
        "train_step": dict(budget=90, models=["demo"], steps=1, warmup=0, batch=4),
        "variants": dict(budget=120, model="demo", steps=1, warmup=0, batch=4, compile="eager", together=True),
        "real_run": dict(
            budget=90, preset="demo", steps=4, checkpoint=2, batch=4, images=16, image_size=32, workers=0,
            extra=["student.embed_dim=32", "student.depth=2", "student.num_heads=2", "dino.head_n_prototypes=64",
                   "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32"],
        ),
        "data_path": dict(
            budget=60, images=8, jpeg_size=(64, 48), batch=4, workers=0, rounds=1,
            crops=dict(global_crops_size=32, local_crops_size=16, local_crops_number=2),
        ),
    },
}  # fmt: skip
SECTIONS = tuple(PLAN["full"])


class Recorder:
    """A section's results, written to its part file after every item (so a timeout keeps what finished)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"results": []}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(self.path)

    def add(self, item: dict) -> None:
        self.data["results"].append(item)
        self.write()

    def attempt(self, item: dict, fn: Callable[[], dict]) -> dict | None:
        """Run one measurement; its result, or its error, joins `item` in the results."""
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as e:  # recorded, and the section goes on with its next item
            self.add({**item, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)})
            return None
        self.add({**item, **got, "seconds": time.perf_counter() - t0})
        return got


def device_info() -> dict:
    """The device, its bf16 peak and the software versions."""
    info: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info.update(
            device=name,
            memory_gb=torch.cuda.get_device_properties(0).total_memory / 1e9,
            peak_bf16_flops=next((v for k, v in PEAK_BF16 if k in name), None),
        )
    else:
        info.update(device="cpu", memory_gb=None, peak_bf16_flops=None)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, timeout=10)
        info["commit"] = commit.stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


# ---------------------------------------------------------------- parity


def _backbone(name: str, registers: int) -> torch.nn.Module:
    """A seeded backbone: ViT-S/L/14 (518 px, LayerScale 1) or a tiny one; register models use the register
    release's interpolation (antialiased, no offset). Tokens get visible random values."""
    from dinoforge.models import vision_transformer as vt

    kw = dict(num_register_tokens=registers, interpolate_antialias=bool(registers), init_values=1.0)
    kw["interpolate_offset"] = 0.0 if registers else 0.1
    torch.manual_seed(0)
    if name == "tiny":
        model = vt.DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, **kw)
    else:
        model = getattr(vt, name)(patch_size=14, img_size=518, block_chunks=0, **kw)
    with torch.no_grad():
        for p in (model.cls_token, model.register_tokens):
            if p is not None:
                p.normal_(std=0.02)
    return model.eval()


def _reference(ours: torch.nn.Module, tmp: Path) -> tuple[str, Callable]:
    """The independent implementation with `ours`' weights: the official dinov2 code (no registers) or the
    transformers Dinov2WithRegisters model (register models, as tests/test_models.py checks them)."""
    a = ours.arch
    if not a["num_register_tokens"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from dinov2.models.vision_transformer import DinoVisionTransformer as Official
        ref = Official(
            img_size=a["img_size"], patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=a["depth"],
            num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"], init_values=a["init_values"],
            ffn_layer=a["ffn_layer"], block_chunks=0,
        )  # fmt: skip
        ref.load_state_dict(ours.state_dict(), strict=True)
        ref = ref.eval()

        def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = ref.to(x.device).forward_features(x)
            return out["x_norm_clstoken"], out["x_norm_patchtokens"]

        return "dinov2==0.0.1.dev2 (official)", run
    from transformers import AutoModel

    from dinoforge.export.hf import export_hf

    export_hf(ours, tmp / "hf")
    hf = AutoModel.from_pretrained(tmp / "hf", attn_implementation="eager").eval()
    r = 1 + a["num_register_tokens"]

    def run_hf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hf.to(x.device)(pixel_values=x).last_hidden_state
        return h[:, 0], h[:, r:]

    return f"transformers {type(hf).__name__}", run_hf


def _features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def _max_err(a: tuple, b: tuple) -> float:
    return max((u.float() - v.float()).abs().max().item() for u, v in zip(a, b, strict=True))


def _rel_err(a: tuple, b: tuple) -> float:
    return max(((u.float() - v.float()).norm() / v.float().norm()).item() for u, v in zip(a, b, strict=True))


def run_parity(plan: dict, rec: Recorder, device: torch.device) -> None:
    """dinoforge vs the reference in fp32 (max abs error, tolerance 1e-4) and dinoforge bf16 autocast vs fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: no TF32 matmuls or convolutions
    torch.backends.cudnn.allow_tf32 = False
    rec.data["tolerance"] = PARITY_TOL
    for name in plan["models"]:
        for registers in plan["registers"]:
            item = {"model": name, "registers": registers}
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    ours = _backbone(name, registers)
                    ref_name, ref = _reference(ours, Path(tmp))
                    ours = ours.to(device)
                except Exception as e:
                    rec.add({**item, "error": f"{type(e).__name__}: {e}"})
                    continue
                for h, w in plan["sizes"]:
                    x = torch.randn(plan["batch"], 3, h, w, generator=torch.Generator().manual_seed(h * w)).to(device)
                    rec.attempt({**item, "size": f"{h}x{w}"}, partial(_parity_of, ours, ref, ref_name, x))
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _parity_of(ours: torch.nn.Module, ref: Callable, ref_name: str, x: torch.Tensor) -> dict:
    with torch.no_grad():
        fp32, theirs = _features(ours, x), ref(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            bf16 = _features(ours, x)
    err = _max_err(fp32, theirs)
    return {
        "reference": ref_name,
        "fp32_max_abs_err": err,
        "fp32_ok": err <= PARITY_TOL,
        "bf16_max_abs_err": _max_err(bf16, fp32),
        "bf16_rel_err": _rel_err(bf16, fp32),
    }


# ---------------------------------------------------------------- training step and variants


def _train_step_module():
    sys.path.insert(0, str(HERE))
    import train_step

    return train_step


def _batch_for(model: str, plan: dict, device: torch.device) -> int:
    """The plan's batch, else the preset's (set for 80 GB) scaled to this GPU's memory, a power of two."""
    if "batch" in plan:
        return plan["batch"]
    preset_batch = _train_step_module().BENCH_MODELS[model][1]
    if device.type != "cuda":
        return preset_batch
    scale = torch.cuda.get_device_properties(0).total_memory / 80e9
    return max(1, 2 ** round(math.log2(max(preset_batch * scale, 1))))


def _threads(device: torch.device) -> int | None:
    """Worker threads: torch's default on CUDA, one for the smoke check's tiny CPU models."""
    return None if device.type == "cuda" else 1


def _has_lightly() -> bool:
    try:
        import lightly  # noqa: F401
    except ImportError:
        return False
    return True


def _with_mfu(r: dict, peak: float | None) -> dict:
    """MFU: the step's counted FLOPs (torch.utils.flop_counter) per second over the device's bf16 peak."""
    if peak and r.get("flops_per_step"):
        r["mfu"] = r["flops_per_step"] * r["img_per_s"] / r["batch"] / peak
    return r


def _memory(r: dict) -> float:
    return r["peak_cuda_mb"] if "peak_cuda_mb" in r else r["step_mem_mb"]


def run_train_step(plan: dict, rec: Recorder, device: torch.device) -> None:
    """dinoforge vs lightly, same model/crops/batch/masks, bf16 autocast on CUDA; halves the batch on failure."""
    ts = _train_step_module()
    peak = device_info()["peak_bf16_flops"]
    lightly = _has_lightly()
    impls = ["dinoforge", "lightly"] if lightly else ["dinoforge"]
    if not lightly:
        missing = "lightly is not installed (pip install '.[bench]'; make gpu-check does)"
        if device.type == "cuda":
            rec.add({"model": "lightly", "error": missing})
        rec.data["lightly"] = f"skipped: {missing}"
    for model in plan["models"]:
        batch = _batch_for(model, plan, device)
        for _ in range(3):  # the batch, then half, then a quarter
            specs = [
                ts.Spec(i, model, batch, plan["steps"], plan["warmup"], str(device), _threads(device), "auto", lightly,
                        count_flops=True)
                for i in impls
            ]  # fmt: skip

            def measure(specs: list = specs) -> dict:
                got = {r["impl"]: _with_mfu(r, peak) for r in ts.measure_pair(specs)}
                out: dict = {"measurements": got}
                if len(got) == 2:
                    d, lt = got["dinoforge"], got["lightly"]
                    speed, memory = d["img_per_s"] / lt["img_per_s"], _memory(d) / _memory(lt)
                    out.update(
                        speed_ratio=speed,
                        memory_ratio=memory,
                        memory_measure="peak_cuda_mb" if "peak_cuda_mb" in d else "step_mem_mb",
                        targets_met=speed >= TARGET_SPEED and memory <= TARGET_MEMORY,
                    )
                return out

            done = rec.attempt({"model": model, "batch": batch}, measure) is not None
            if done or device.type != "cuda" or batch == 1:
                break
            batch //= 2  # most likely out of memory: the next try at half the batch


def run_variants(plan: dict, rec: Recorder, device: torch.device) -> None:
    """dinoforge alone under each variant, against its default step in the same run."""
    from dinoforge.config.config import default_config

    ts = _train_step_module()
    model, batch = plan["model"], _batch_for(plan["model"], plan, device)
    variants: list[tuple[str, list[str], dict]] = [("default", [], {})]
    if "sequence_packing" in default_config().train:  # the packing branch's key, once merged
        variants += [
            ("packed", ["train.sequence_packing=true"], {}),
            ("unpacked", ["train.sequence_packing=false"], {}),
        ]
    variants += [
        ("fsdp2_one_process", [], {"fsdp": True}),
        ("foreach_adamw", [], {"fused": False}),
        ("activation_checkpointing", ["train.activation_checkpointing=true"], {}),
        (f"compile_{plan['compile']}", [], {"compile": plan["compile"]}),
    ]
    specs = {
        name: ts.Spec(
            "dinoforge", model, batch, plan["steps"], plan["warmup"], str(device), _threads(device), "auto", False,
            overrides, options,
        )
        for name, overrides, options in variants
    }  # fmt: skip
    if plan.get("together"):  # all workers at once: with tiny models, their start-up is the time
        together = dict(zip(specs, ts.measure_pair(list(specs.values())), strict=True))
    base = None
    for name, spec in specs.items():
        measure = (lambda name=name: together[name]) if plan.get("together") else partial(ts.measure_pair, [spec])
        got = rec.attempt(
            {"variant": name, "model": model, "batch": batch, "overrides": spec.overrides},
            partial(_variant_of, measure, base),
        )
        if name == "default":
            base = got


def _variant_of(measure: Callable[[], dict | list[dict]], base: dict | None) -> dict:
    r = measure()
    r = r[0] if isinstance(r, list) else r
    out = {k: r[k] for k in ("img_per_s", "step_ms_median", "precision") if k in r}
    out["memory_mb"] = _memory(r)
    if base is not None:
        out["speed_vs_default"] = r["img_per_s"] / base["img_per_s"]
        out["memory_vs_default"] = out["memory_mb"] / base["memory_mb"]
    return out


# ---------------------------------------------------------------- real run


def _image_folder(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """`n` smooth random RGB images (upsampled noise, so crops differ in content) as PNG files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(root / f"img_{i:05d}.png")
    return root


def _same_state(a: object, b: object, where: str = "") -> list[str]:
    """Paths of the tensors (or values) that differ between two checkpoint objects."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys)"]
        return [d for k in a for d in _same_state(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        return [d for i, (u, v) in enumerate(zip(a, b, strict=True)) for d in _same_state(u, v, f"{where}[{i}]")]
    return [] if a == b else [where]


def _losses(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if "loss" in k or k == "iteration"} for r in csv.DictReader(f)]


def run_real_run(plan: dict, rec: Recorder, device: torch.device) -> None:
    """`steps` iterations on a generated image folder, checkpoints every `checkpoint`; then a second run resumed
    from the first checkpoint must end with the same checkpoint, bit for bit (deterministic algorithms on)."""
    from dinoforge.config.config import load_config
    from dinoforge.train import loop

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    steps, period = plan["steps"], plan["checkpoint"]
    overrides = [
        f"train.batch_size_per_gpu={plan['batch']}",
        f"train.OFFICIAL_EPOCH_LENGTH={period}",
        f"optim.epochs={steps // period}",
        "optim.warmup_epochs=1",
        "teacher.warmup_teacher_temp_epochs=1",
        f"train.checkpoint_period_iterations={period}",
        f"train.num_workers={plan['workers']}",
        "evaluation.eval_period_iterations=0",
        "crops.batched_augmentation=true",
        "train.recipe=official",  # the schedule lengths as given here
        *plan.get("extra", []),
    ]
    work = Path(tempfile.mkdtemp(prefix="dinoforge-gpu-check-"))
    try:
        data = _image_folder(work / "images", plan["images"], plan["image_size"])
        first, resumed = work / "run", work / "resumed"
        state: dict = {}

        def train() -> dict:
            t0 = time.perf_counter()
            summary = loop.train(load_config(plan["preset"], overrides), first, data=str(data), quiet=True)
            seconds = time.perf_counter() - t0
            losses = _losses(first)
            finite = all(math.isfinite(float(v)) for r in losses for k, v in r.items() if k != "iteration" and v)
            state["losses"] = losses
            last = summary["last"]
            return {
                "preset": plan["preset"],
                "steps": summary["iterations"],
                "batch": plan["batch"],
                "images_per_s": last["images_per_s"],
                "train_seconds": seconds,
                "losses_finite": finite,
                "final_total_loss": last["total_loss"],
                "first_total_loss": float(losses[0]["total_loss"]),
            }

        if rec.attempt({"part": "train"}, train) is None:
            return

        def resume() -> dict:
            (resumed / "checkpoints").mkdir(parents=True)
            name = f"model_{period - 1:07d}.pth"
            shutil.copy(first / "checkpoints" / name, resumed / "checkpoints" / name)
            loop.train(load_config(plan["preset"], overrides), resumed, data=str(data), resume=True, quiet=True)
            final = f"model_{steps - 1:07d}.pth"
            a = torch.load(first / "checkpoints" / final, map_location="cpu", weights_only=False)
            b = torch.load(resumed / "checkpoints" / final, map_location="cpu", weights_only=False)
            a.pop("config", None), b.pop("config", None)  # it names each run's own output folder
            differing = _same_state(a, b)
            same_losses = _losses(resumed) == [r for r in state["losses"] if int(r["iteration"]) >= period]
            return {
                "resumed_from_iteration": period - 1,
                "bit_exact": not differing,
                "losses_equal": same_losses,
                "differing": differing[:10],
                "n_differing": len(differing),
            }

        rec.attempt({"part": "resume"}, resume)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_data_path(plan: dict, rec: Recorder, device: torch.device) -> None:
    """Generated JPEGs packed into shards; loader workers read them (decoded to uint8 by PIL, or as bytes for nvJPEG)
    and the batched multi-crop augmentation runs on the device: images/s of each, best of the rounds."""
    sys.path.insert(0, str(HERE))
    import data_path

    from dinoforge.data.batch_augment import BatchAugmentationDINO, decode_jpegs, to_uint8_tensor
    from dinoforge.data.datasets import build_dataset
    from dinoforge.data.pack import pack_shards

    work = Path(tempfile.mkdtemp(prefix="dinoforge-data-path-"))
    try:
        folder = work / "images"
        folder.mkdir()
        for i, data in enumerate(data_path.make_jpegs(plan["images"], plan["jpeg_size"])):
            (folder / f"{i:06d}.jpg").write_bytes(data)
        spec = pack_shards(build_dataset(folder), work / "shards", max_images=max(1, plan["images"] // 4))["spec"]
        augment = BatchAugmentationDINO(**plan["crops"], device=device)
        decoders = {  # what a loader worker returns per image, and how the batch becomes uint8 images on the device
            "pil_decode_in_workers": (to_uint8_tensor, lambda batch: batch),
            "decode_jpeg_on_device": (None, lambda batch: decode_jpegs(batch, device)),
        }
        for name, (transform, to_images) in decoders.items():
            dataset = build_dataset(spec, transform=transform)
            if transform is None:
                dataset = data_path.Encoded(dataset)

            def measure(dataset=dataset, to_images=to_images) -> dict:
                def epoch() -> int:
                    loader = torch.utils.data.DataLoader(
                        dataset, batch_size=plan["batch"], num_workers=plan["workers"], collate_fn=_images
                    )
                    n = 0
                    for batch in loader:
                        generators = [torch.Generator().manual_seed(n + i) for i in range(len(batch))]
                        augment(to_images(batch), generators)
                        n += len(batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    return n

                epoch()  # warm-up: workers' first imports, cuDNN/nvJPEG set-up
                return {
                    "images_per_s": data_path._best_rate(epoch, plan["rounds"]),
                    "images": plan["images"],
                    "workers": plan["workers"],
                    "crops": plan["crops"],
                }

            rec.attempt({"path": name}, measure)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _images(batch: list) -> list:
    """Collate to a list: images of different sizes, or encoded bytes (item 0 of a (image, label, index) sample)."""
    return [b[0] if isinstance(b, tuple) else b for b in batch]


def data_path_vs_step(report: dict) -> dict | None:
    """The data path's best images/s over the training step's (ViT-L/14 when measured, else the last model), from
    the two sections of one run; None when either is missing."""
    steps = [r for r in report["sections"].get("train_step", {}).get("results", []) if "error" not in r]
    paths = [r for r in report["sections"].get("data_path", {}).get("results", []) if "error" not in r]
    if not steps or not paths:
        return None
    step = next((r for r in steps if r["model"] == "vitl14_full"), steps[-1])
    step_rate = step["measurements"]["dinoforge"]["img_per_s"]
    best = max(paths, key=lambda r: r["images_per_s"])
    ratio = best["images_per_s"] / step_rate
    return {
        "model": step["model"],
        "step_images_per_s": step_rate,
        "data_path": best["path"],
        "data_path_images_per_s": best["images_per_s"],
        "ratio": ratio,
        "target_met": ratio >= TARGET_DATA_PATH,
    }


RUNNERS: dict[str, Callable[[dict, Recorder, torch.device], None]] = {
    "parity": run_parity,
    "train_step": run_train_step,
    "variants": run_variants,
    "real_run": run_real_run,
    "data_path": run_data_path,
}


# ---------------------------------------------------------------- driver


def _section_child(name: str, mode: str, part: Path) -> None:
    rec = Recorder(part)
    device = torch.device("cuda" if mode == "full" else "cpu")
    if mode == "smoke":  # tiny models: one thread is fastest, and spares a shared machine
        torch.set_num_threads(1)
    RUNNERS[name](PLAN[mode][name], rec, device)


def _run_section(name: str, mode: str, out: Path) -> dict:
    """One section in its own process group, killed at its budget; what it recorded is kept either way."""
    budget = PLAN[mode][name]["budget"]
    part = out.with_name(f"{out.stem}.{name}.part.json")
    part.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--mode", mode, "--part", str(part)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc == 0 else f"error: exit code {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timeout after {budget} s"
    try:
        data = json.loads(part.read_text())
    except (OSError, ValueError):
        data = {"results": []}
    part.unlink(missing_ok=True)
    errors = [r for r in data["results"] if "error" in r]
    if status == "ok" and errors:
        status = f"error: {len(errors)} item(s) failed"
    return {"status": status, "seconds": time.perf_counter() - t0, "budget_s": budget, **data}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _summary(name: str, section: dict) -> str:
    """One line that says what a section found."""
    rows = [r for r in section.get("results", []) if "error" not in r]
    if name == "parity" and rows:
        ok = sum(r["fp32_ok"] for r in rows)
        worst = max(r["fp32_max_abs_err"] for r in rows)
        bf16 = max(r["bf16_rel_err"] for r in rows)
        return f"fp32 within {PARITY_TOL:g}: {ok}/{len(rows)} (worst {worst:.2g}); bf16 vs fp32 rel err <= {bf16:.2g}"
    if name == "train_step":
        parts = []
        for r in rows:
            m = r["measurements"]["dinoforge"]
            line = f"{r['model']} b{r['batch']}: {m['img_per_s']:.0f} img/s"
            if "mfu" in m:
                line += f" MFU {100 * m['mfu']:.0f}%"
            if "speed_ratio" in r:
                line += f" {r['speed_ratio']:.2f}x lightly speed, {r['memory_ratio']:.2f}x memory"
            parts.append(line)
        return "; ".join(parts)
    if name == "variants":
        return "; ".join(
            f"{r['variant']} {_fmt(r.get('speed_vs_default', 1.0))}x/{_fmt(r.get('memory_vs_default', 1.0))}x mem"
            for r in rows
        )
    if name == "real_run":
        got = {r["part"]: r for r in rows}
        out = []
        if "train" in got:
            t = got["train"]
            out.append(f"{t['steps']} steps, losses finite: {t['losses_finite']}, {t['images_per_s']:.0f} img/s")
        if "resume" in got:
            out.append(f"resume bit-exact: {got['resume']['bit_exact']}")
        return "; ".join(out)
    if name == "data_path":
        out = [f"{r['path']} {r['images_per_s']:.0f} img/s" for r in rows]
        vs = section.get("vs_train_step")
        if vs:
            out.append(f"{vs['ratio']:.2f}x the {vs['model']} step ({vs['step_images_per_s']:.0f} img/s)")
        return "; ".join(out)
    return ""


def print_table(report: dict) -> None:
    print(f"\nGPU check ({report['mode']}) on {report['env']['device']}, torch {report['env']['torch']}")
    print(f"{'section':<12} {'status':<28} {'seconds':>8}  summary")
    for name, section in report["sections"].items():
        print(f"{name:<12} {section['status'][:28]:<28} {section['seconds']:>8.1f}  {_summary(name, section)}")
        for r in section.get("results", []):
            if "error" in r:
                what = " ".join(
                    f"{k}={r[k]}" for k in ("model", "registers", "size", "variant", "part", "path") if k in r
                )
                print(f"{'':<12} error ({what}): {r['error'][:160]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the GPU check (needs CUDA)")
    mode.add_argument("--smoke", action="store_true", help="tiny models on CPU, every code path, seconds")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, help="result file (default benchmarks/results/gpu-<date>-<device>.json)")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=list(PLAN), help=argparse.SUPPRESS)
    ap.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        _section_child(args.section, args.mode, args.part)
        return 0
    cuda = torch.cuda.is_available()
    if args.full and not cuda:
        print("error: --full needs a CUDA device; run --smoke (or no flag) here", file=sys.stderr)
        return 2
    run_mode = "full" if args.full or (cuda and not args.smoke) else "smoke"
    if run_mode == "smoke" and not args.smoke:
        print("no CUDA device: running the --smoke check (tiny models, every code path, no timing)", flush=True)
    names = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
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
        report["sections"][name] = _run_section(name, run_mode, args.out)
        if name == "data_path":
            report["sections"][name]["vs_train_step"] = data_path_vs_step(report)
        args.out.write_text(json.dumps(report, indent=1, default=float))
    print_table(report)
    print(f"\nresults: {args.out}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

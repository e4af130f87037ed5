"""Sequence packing of the student's crops vs one batch per crop size: forward+backward time of the student backbone.

The student of a config preset (its drop path and registers included, in training mode) gets the global crops (with
iBOT masks) and the local crops as a list, as `SSLMetaArch.forward_backward` gives them, and runs them per crop size
(`packing=None`, the reference) or packed with NJT or flex_attention block-diagonal attention. Steps alternate the
variants (order reversed every step) so background load hits them alike. Prints one JSON line per measurement, then
per packed variant the speed-up over the per-crop path in the same run (per_crop ms / packed ms: > 1 is faster).
flex_attention has no backward on CPU: there it is timed forward-only (no grad), beside the others.

    .venv/bin/python benchmarks/packing.py                          # demo + ViT-S/14 (2x224 + 8x98), CPU, < 2 min
    .venv/bin/python benchmarks/packing.py --device cuda --models vits14 vitl14 --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from contextlib import nullcontext

import torch

from dinoforge.config.config import load_config
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.train.meta_arch import backbone_kwargs
from dinoforge.utils import resolve_device

# benchmark model -> (config preset, default batch); crops as in the preset (vits14/vitl14: 2x224 + 8x98)
MODELS = {"demo": ("demo", 16), "vits14": ("vits14", 2), "vitl14": ("vitl14", 2)}
VARIANTS = {"per_crop": None, "njt": "njt", "flex": "flex"}


def build(preset: str, device: torch.device) -> tuple[DinoVisionTransformer, dict]:
    """The preset's student backbone in training mode, and its crop set-up."""
    cfg = load_config(preset)
    torch.manual_seed(0)
    s = cfg.student
    model = DinoVisionTransformer(
        **backbone_kwargs(cfg), drop_path_rate=s.drop_path_rate, drop_path_uniform=s.drop_path_uniform
    )
    crops = dict(g=cfg.crops.global_crops_size, l=cfg.crops.local_crops_size, n=cfg.crops.local_crops_number)
    return model.to(device).train(), crops


def inputs(model: DinoVisionTransformer, crops: dict, batch: int, device: torch.device) -> tuple[list, list]:
    """2·batch global crops with random iBOT masks (~30 % of patches) and n·batch local crops."""
    gen = torch.Generator().manual_seed(0)
    g, loc, p = crops["g"], crops["l"], model.patch_size
    x = [torch.randn(2 * batch, 3, g, g, generator=gen), torch.randn(crops["n"] * batch, 3, loc, loc, generator=gen)]
    masks = torch.rand(2 * batch, (g // p) ** 2, generator=gen) < 0.3
    return [t.to(device) for t in x], [masks.to(device), None]


def step(model, x, masks, packing, backward: bool, precision) -> None:
    """One student forward (+ backward of a loss on CLS and patch tokens of every crop)."""
    autocast = torch.autocast(x[0].device.type, dtype=precision) if precision is not None else nullcontext()
    with autocast, torch.set_grad_enabled(backward):
        out = model.forward_features(x, masks, packing=packing)
        loss = sum(o["x_norm_clstoken"].float().mean() + o["x_norm_patchtokens"].float().mean() for o in out)
    if backward:
        loss.backward()
        model.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(name: str, args, device: torch.device, precision) -> None:
    preset, default_batch = MODELS[name]
    batch = args.batch or default_batch
    model, crops = build(preset, device)
    x, masks = inputs(model, crops, batch, device)
    tokens = sum(t.shape[0] * ((t.shape[-1] // model.patch_size) ** 2 + 1 + model.num_register_tokens) for t in x)
    common = dict(bench="packing", model=name, device=str(device), precision=str(precision or torch.float32)[6:],
                  threads=torch.get_num_threads(), batch=batch, crops=f"2x{crops['g']}+{crops['n']}x{crops['l']}",
                  tokens=tokens)  # fmt: skip
    with torch.no_grad():
        model.eval()
        ref = model.forward_features(x, masks)
        for v in ("njt", "flex"):
            got = model.forward_features(x, masks, packing=v)
            diff = max((a["x_prenorm"] - b["x_prenorm"]).abs().max().item() for a, b in zip(ref, got, strict=True))
            print(json.dumps({**common, "check": f"{v} vs per_crop max |x_prenorm| diff (eval)", "value": diff}))
        model.train()
    for mode in ("fwd_bwd", "fwd"):
        backward = mode == "fwd_bwd"
        variants = dict(VARIANTS)
        if backward and device.type == "cpu":
            variants.pop("flex")
            print(json.dumps({**common, "mode": mode, "variant": "flex", "supported": False,
                              "why": "flex_attention has no backward on CPU"}), flush=True)  # fmt: skip
        times: dict[str, list[float]] = {v: [] for v in variants}
        peak: dict[str, int] = {}
        order = list(variants)
        for i in range(args.warmup + args.steps):
            for v in order if i % 2 == 0 else order[::-1]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                t0 = time.perf_counter()
                step(model, x, masks, variants[v], backward, precision)
                _sync(device)
                if i >= args.warmup:
                    times[v].append(time.perf_counter() - t0)
                    if device.type == "cuda":
                        peak[v] = torch.cuda.max_memory_allocated(device)
        for v, ts in times.items():
            line = {**common, "mode": mode, "variant": v, "steps": len(ts),
                    "ms_median": round(1e3 * statistics.median(ts), 2), "ms_min": round(1e3 * min(ts), 2)}  # fmt: skip
            if v in peak:
                line["peak_cuda_mb"] = round(peak[v] / 2**20, 1)
            print(json.dumps(line), flush=True)
        base = statistics.median(times["per_crop"])
        for v in variants:
            if v != "per_crop":
                speedup = base / statistics.median(times[v])
                ratio = {"ratio": f"per_crop/{v} ms_median", "speedup": round(speedup, 3)}
                print(json.dumps({**common, "mode": mode, **ratio}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["demo", "vits14"], choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=0, help="images per step (0: the model's default)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA")
    args = ap.parse_args()
    device = resolve_device(args.device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    warnings.filterwarnings("ignore", message=".*(nested tensors|flex_attention called without).*")
    for name in args.models:
        run(name, args, device, torch.bfloat16 if bf16 else None)


if __name__ == "__main__":
    main()

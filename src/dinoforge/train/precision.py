"""Training precision: the autocast and FSDP2 parameter dtypes, and what `auto` means on each device.

`compute_precision.autocast: auto` is bf16 on CUDA devices that support it. On a CPU it is bf16 only where the CPU
has bf16 matrix units (Intel AMX, AVX512-BF16) *and* a one-off timing of the student's forward + backward at the
run's crop size measures bf16 autocast faster than fp32; elsewhere fp32. Tiny models can be slower in bf16 even on
AMX (the casts cost more than the small matrix products gain), hence the timing rather than a flag check alone.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dinoforge import distributed as dist_utils
from dinoforge.utils import DinoforgeError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions
BF16_MIN_SPEEDUP = 1.1  # bf16 must measure this much faster, so that noise does not flip the choice
PROBE_DEPTH = 2  # blocks of the student the timing builds: every block has the same matrix sizes


def _precision(cfg: DictConfig, key: str, auto: torch.dtype | None) -> torch.dtype | None:
    """The low-precision dtype named by compute_precision.`key` (None: fp32), `auto` for "auto"."""
    mode = cfg.compute_precision[key]
    if mode == "auto":
        return auto
    if mode not in _DTYPES:
        raise DinoforgeError(f"compute_precision.{key} must be auto, {', '.join(_DTYPES)}; got {mode!r}")
    return _DTYPES[mode]


def autocast_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of the forward/backward. `auto` left in the config (not resolved by `resolve_cpu_autocast`)
    is bf16 on CUDA devices that support it and fp32 elsewhere."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return _precision(cfg, "autocast", torch.bfloat16 if bf16_ok else None)


def fsdp_param_dtype(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """FSDP2's parameter dtype in forward/backward (MixedPrecisionPolicy; master weights and reduction stay fp32)."""
    return _precision(cfg, "fsdp_param_dtype", autocast_dtype(cfg, device))


def cpu_bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The bf16 matrix-instruction flags this CPU reports (empty: none, or not Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_BF16_FLAGS if f in flags]


def time_student_step(cfg: DictConfig, dtype: torch.dtype | None, repeats: int = 2) -> float:
    """Seconds of one forward + backward of a PROBE_DEPTH-block copy of the student on a batch of global crops
    (at most 16 images), under autocast to `dtype` (None: fp32); the fastest of `repeats` after one warm-up."""
    from dinoforge.models.vision_transformer import DinoVisionTransformer
    from dinoforge.train.meta_arch import backbone_kwargs

    kw = backbone_kwargs(cfg)
    kw["depth"] = min(kw["depth"], PROBE_DEPTH)
    kw["block_chunks"] = 0
    net = DinoVisionTransformer(**kw)
    size = cfg.crops.global_crops_size
    x = torch.randn(min(int(cfg.train.batch_size_per_gpu), 16), 3, size, size)
    best = float("inf")
    for i in range(repeats + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = net.forward_features(x)
            loss = out["x_norm_clstoken"].float().square().mean() + out["x_norm_patchtokens"].float().square().mean()
        loss.backward()
        if i:
            best = min(best, time.perf_counter() - t)
    return best


def resolve_cpu_autocast(cfg: DictConfig, device: torch.device, saved: DictConfig | None, say) -> None:
    """Replace `compute_precision.autocast: auto` by the CPU's choice (module docstring), in `cfg` itself, so the
    saved config.yaml holds it; where the CPU has bf16 units it says why (one line through `say`). A resumed run
    passes its saved config as `saved` and keeps the choice it made at the start: its numerics stay the run's."""
    if device.type != "cpu" or cfg.compute_precision.autocast != "auto":
        return
    kept = saved.compute_precision.autocast if saved is not None else "auto"
    if kept in ("bf16", "fp32") or not cpu_bf16_units():  # resumed, or nothing to choose: said in config.yaml only
        OmegaConf.update(cfg, "compute_precision.autocast", kept if kept != "auto" else "fp32")
        return
    units = cpu_bf16_units()
    fp32_s, bf16_s = time_student_step(cfg, None), time_student_step(cfg, torch.bfloat16)
    speedup = fp32_s / bf16_s
    choice = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    why = (
        f"{'/'.join(units)}: the student's forward+backward measured {speedup:.2f}x faster in bf16 "
        f"({fp32_s * 1e3:.0f} vs {bf16_s * 1e3:.0f} ms; bf16 needs >= {BF16_MIN_SPEEDUP}x)"
    )
    choice, why = dist_utils.broadcast_object((choice, why))  # every rank runs at rank 0's precision
    OmegaConf.update(cfg, "compute_precision.autocast", choice)
    say(f"compute_precision.autocast auto -> {choice} on this CPU: {why}")

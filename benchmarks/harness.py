"""The benchmarks' shared harness: dinoforge's training step on the package's batches, paired measurement workers
(one spawned process per implementation, steps alternated), the optional peers, JSON lines, the CLI and results."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import typer

from dinoforge.config.config import load_config
from dinoforge.data.datasets import build_dataset
from dinoforge.train.data import SeededAugment, crops_and_masks
from dinoforge.train.meta_arch import SSLMetaArch, backbone_kwargs
from dinoforge.train.precision import fsdp_param_dtype
from dinoforge.train.schedules import build_schedulers
from dinoforge.train.step import TrainStep, build_optimizer
from dinoforge.utils import DinoforgeError, write_json

# Benchmark presets: config preset, default batch, and overrides applied to both implementations.
# softmax-centering is used because lightly has no Sinkhorn-Knopp; everything else is the preset's recipe.
_REDUCED = [  # the ViT presets at reduced crops and prototypes, so that a CPU step takes seconds
    "train.centering=centering",
    "crops.global_crops_size=98",
    "crops.local_crops_size=42",
    "crops.local_crops_number=4",
    "dino.head_n_prototypes=16384",
    "ibot.head_n_prototypes=16384",
]
# benchmark model -> (config preset, default batch, overrides)
BENCH_MODELS: dict[str, tuple[str, int, list[str]]] = {
    "demo": ("demo", 64, ["train.centering=centering"]),
    "vits14": ("vits14", 16, _REDUCED),
    # ViT-L/14 keeps its preset's stochastic depth (0.3, uniform), where dinoforge computes each residual branch
    # on the kept samples only and timm's DropPath computes it for all and zeroes the dropped ones.
    "vitl14": ("vitl14", 8, _REDUCED),
    # the official crops (2x224 + 8x98) and 65,536 prototypes: the GPU check's presets, batch per 80 GB
    "vits14_full": ("vits14", 128, ["train.centering=centering"]),
    "vitb14_full": ("vitb14", 64, ["train.centering=centering"]),
    "vitl14_full": ("vitl14", 32, ["train.centering=centering"]),
}
IMPLS = ("dinoforge", "lightly")


@dataclass
class Spec:
    """Everything one measurement process needs (picklable for the spawned worker)."""

    impl: str
    model: str
    batch: int
    steps: int
    warmup: int
    device: str
    threads: int | None
    precision: str
    import_lightly: bool
    overrides: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # DinoforgeStep keywords: compile, fsdp, fused
    count_flops: bool = False  # count one extra step's FLOPs (torch.utils.flop_counter) before the timed ones


def _amp(spec: Spec) -> bool:
    """bf16 autocast: asked for, or `auto` on CUDA (fp32 on CPU, as `compute_precision.autocast: auto` there)."""
    return spec.precision == "bf16" or (spec.precision == "auto" and spec.device.startswith("cuda"))


def _config(spec: Spec):
    preset, _, overrides = BENCH_MODELS[spec.model]
    precision = f"compute_precision.autocast={'bf16' if _amp(spec) else 'fp32'}"  # dinoforge's step autocasts itself
    return load_config(preset, [*overrides, precision, *spec.overrides, f"train.batch_size_per_gpu={spec.batch}"])


def _batches(cfg, n: int, seed: int = 0) -> list[dict]:
    """`n` training batches as `dinoforge train` makes them: the package's crops and masks over bundled images."""
    transform, collate = crops_and_masks(cfg)
    data = SeededAugment(build_dataset("bundled:train", split="train"), transform)
    b = cfg.train.batch_size_per_gpu
    keys = [[((i * b + j) % len(data), seed + i * b + j) for j in range(b)] for i in range(n)]
    return [collate.finish(collate([data[k] for k in batch])) for batch in keys]


class DinoforgeStep:
    """dinoforge's training step: `train.step.TrainStep`, the step `dinoforge train` runs, on the config's schedules.

    Variants: `compile` (a torch.compile backend, e.g. "inductor") compiles every transformer block; `fsdp` shards
    the model with FSDP2 in a one-process group as the loop does across processes (then AdamW is the for-each
    one, as there); `fused=False` takes the for-each AdamW."""

    def __init__(self, cfg, device: torch.device, compile: str | None = None, fsdp: bool = False, fused: bool = True):
        self.model = SSLMetaArch(cfg).to(device).train()
        if fsdp:
            from dinoforge.train.distributed import fully_shard_model

            _one_process_group(device)
            fully_shard_model(self.model, fsdp_param_dtype(cfg, device))
        if compile:
            for side in (self.model.student, self.model.teacher):
                for block in side.backbone.blocks:
                    block.compile(backend=compile)
        optimizer = build_optimizer(cfg, self.model, fused=fused and not fsdp)
        schedules = build_schedulers(cfg, 1)
        self.step = TrainStep(cfg, self.model, optimizer, schedules, device, fsdp)
        self.it, self.n_iter = 0, len(schedules.lr)

    def __call__(self, batch: dict) -> None:
        self.step(self.it % self.n_iter, batch)
        self.it += 1


def _one_process_group(device: torch.device) -> None:
    """A process group of this process alone (NCCL on CUDA, gloo on CPU), for FSDP2 in one process."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(spec: Spec, conn) -> None:
    """One implementation in its own process: build, then run a step per "step" message and answer its times.

    Steps of the two implementations are alternated by the parent, so both see the same machine load; a
    separate process per implementation keeps each one's peak memory its own. "done" answers the summary.
    """
    if spec.import_lightly:  # both workers import both stacks, so their baselines are alike
        import lightly.loss
        import lightly.models.modules  # noqa: F401
    rss_baseline = _rss_mb()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(0)
    device = torch.device(spec.device)
    cfg = _config(spec)
    if spec.impl == "dinoforge":
        step = DinoforgeStep(cfg, device, **spec.options)
    else:
        from lightly_step import LightlyStep  # benchmarks/ is on the spawned worker's sys.path too

        step = LightlyStep(cfg, device)
    batches = _batches(cfg, 2)
    if spec.impl == "lightly":
        batches = [step.prepare(b) for b in batches]
    batches = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()} for b in batches]
    amp = _amp(spec)
    lightly_amp = amp and spec.impl == "lightly"
    cuda = device.type == "cuda"
    flops = None
    if spec.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16) if lightly_amp else nullcontext():
                step(batches[0])
        flops = counter.get_total_flops()
    conn.send("ready")
    i = 0
    while (msg := conn.recv()) != "done":
        if msg == "reset_peak" and cuda:
            torch.cuda.reset_peak_memory_stats()
        if msg != "step":
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(device.type, dtype=torch.bfloat16) if lightly_amp else nullcontext():
            step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        conn.send((time.perf_counter() - t0, time.process_time() - c0))
        i += 1
    result = {
        "impl": spec.impl,
        "model": spec.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": "bf16" if amp else "fp32",
        "batch": spec.batch,
        "crops": f"2x{cfg.crops.global_crops_size}+{cfg.crops.local_crops_number}x{cfg.crops.local_crops_size}",
        "arch": "embed{embed_dim} depth{depth} heads{num_heads} patch{patch_size}".format(**backbone_kwargs(cfg)),
        "prototypes": int(cfg.dino.head_n_prototypes),
        "peak_rss_mb": _rss_mb(),
        "rss_baseline_mb": rss_baseline,
        "step_mem_mb": _rss_mb() - rss_baseline,
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if flops is not None:
        result["flops_per_step"] = flops
    conn.send(result)


def measure_pair(specs: list[Spec]) -> list[dict]:
    """Run the implementations' workers side by side; warm-up and timed steps alternate (order flipped each step)."""
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for spec in specs:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(spec, child), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    finished = False
    try:
        for c in conns:
            c.recv()  # "ready"
        times: list[list[tuple[float, float]]] = [[] for _ in specs]
        n_warm, n_steps = specs[0].warmup, specs[0].steps
        for k in range(n_warm + n_steps):
            if k == n_warm:
                for c in conns:
                    c.send("reset_peak")
            order = range(len(specs)) if k % 2 == 0 else reversed(range(len(specs)))
            for j in order:
                conns[j].send("step")
                t = conns[j].recv()
                if k >= n_warm:
                    times[j].append(t)
        results = []
        for spec, c, t in zip(specs, conns, times, strict=True):
            c.send("done")
            r = c.recv()
            wall = [w for w, _ in t]
            r.update(
                steps=n_steps,
                warmup=n_warm,
                img_per_s=spec.batch * n_steps / sum(wall),
                img_per_s_median=spec.batch / statistics.median(wall),
                step_ms_median=1000 * statistics.median(wall),
                cpu_s_per_step=sum(c for _, c in t) / n_steps,  # process CPU time, all threads
            )
            results.append(r)
        finished = True
        return results
    finally:
        for proc in procs:  # after a failure (e.g. one worker ran out of memory) the others are stopped at once
            proc.join(timeout=30 if finished else 0)
            if proc.is_alive():
                proc.kill()


def has_lightly() -> bool:
    """Whether the optional peer lightly (the `bench` extra) is installed."""
    return importlib.util.find_spec("lightly") is not None


def require_lightly() -> None:
    if not has_lightly():
        raise DinoforgeError("lightly is not installed: pip install 'lightly==1.6.0' (the `bench` extra)")


def emit(line: dict) -> None:
    """One measurement as one JSON line on stdout."""
    print(json.dumps(line, default=float), flush=True)


def save(out: Path, measurements: list[dict], ratios: list[dict]) -> Path:
    """results.json of a benchmark run (its measurements, ratios and arguments) in `out`; named on stderr."""
    results = {"measurements": measurements, "ratios": ratios, "argv": sys.argv[1:]}
    path = write_json(Path(out) / "results.json", results)
    print(f"results: {path}", file=sys.stderr)
    return path


def dinoforge_cli(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`dinoforge ARGS` in a subprocess with this interpreter (no progress bars); raises with its last error line."""
    env = {**os.environ, "DINOFORGE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "dinoforge", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DinoforgeError(f"dinoforge {' '.join(args[:1])} failed ({proc.returncode}): {last}")
    return proc


def run_cli(main_fn) -> None:
    """Run a benchmark's typer `main_fn` as a script: unbuffered output, a DinoforgeError as one `error:` line."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        typer.run(main_fn)
    except DinoforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

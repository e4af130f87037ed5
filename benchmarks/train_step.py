"""Images/s and peak memory of one DINOv2 training step: dinoforge vs the same recipe built from lightly 1.6.

One step = teacher forward, student forward + backward (DINO + iBOT + KoLeo), gradient clipping, AdamW step and
EMA teacher update, on identical pre-collated batches (same crops, same block masks) for both implementations.
Each implementation runs in its own spawned process (so its peak memory is its own) and the parent alternates
their steps (so both see the same machine load). Prints one JSON line per measurement, then one ratio line
(dinoforge img/s ÷ lightly img/s) per model.

    python benchmarks/train_step.py                          # demo + ViT-S/14 (reduced crops), CPU
    python benchmarks/train_step.py --models vitl14          # ViT-L/14 with its stochastic depth 0.3
    python benchmarks/train_step.py --device cuda --models vits14 --batch 64
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer

from dinoforge.utils import DinoforgeError, resolve_device, track, write_json

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
    from dinoforge.config.config import load_config

    preset, _, overrides = BENCH_MODELS[spec.model]
    precision = f"compute_precision.autocast={'bf16' if _amp(spec) else 'fp32'}"  # dinoforge's step autocasts itself
    return load_config(preset, [*overrides, precision, *spec.overrides, f"train.batch_size_per_gpu={spec.batch}"])


def _batches(cfg, n: int, seed: int = 0) -> list[dict]:
    """`n` training batches as `dinoforge train` makes them: the package's crops and masks over bundled images."""
    from dinoforge.data.datasets import build_dataset
    from dinoforge.train.data import SeededAugment, crops_and_masks

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
        from dinoforge.train.meta_arch import SSLMetaArch
        from dinoforge.train.precision import fsdp_param_dtype
        from dinoforge.train.schedules import build_schedulers
        from dinoforge.train.step import TrainStep, build_optimizer

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


class LightlyStep:
    """The same step assembled from lightly's blocks as in its DINOv2 example (timm ViT + lightly heads/losses)."""

    def __init__(self, cfg, device: torch.device):
        from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import get_weight_decay_parameters, update_drop_path_rate
        from timm.models.vision_transformer import VisionTransformer

        from dinoforge.train.meta_arch import backbone_kwargs

        arch = backbone_kwargs(cfg)
        if arch["ffn_layer"] != "mlp":
            raise DinoforgeError(f"the lightly side supports ffn_layer=mlp only, got {arch['ffn_layer']!r}")
        vit = VisionTransformer(
            img_size=arch["img_size"],
            patch_size=arch["patch_size"],
            embed_dim=arch["embed_dim"],
            depth=arch["depth"],
            num_heads=arch["num_heads"],
            qkv_bias=arch["qkv_bias"],
            init_values=arch["init_values"],
            reg_tokens=arch["num_register_tokens"],
            num_classes=0,
            pos_embed="learn",
            dynamic_img_size=True,
        )
        backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")

        def head(c) -> DINOv2ProjectionHead:
            warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
            return DINOv2ProjectionHead(
                input_dim=arch["embed_dim"],
                hidden_dim=c.head_hidden_dim,
                bottleneck_dim=c.head_bottleneck_dim,
                output_dim=c.head_n_prototypes,
            )

        def pair() -> torch.nn.ModuleDict:  # weight-normed heads cannot be deep-copied: build twice, load state
            dino = head(cfg.dino)
            ibot = head(cfg.ibot) if cfg.ibot.separate_head else dino
            return torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "dino_head": dino, "ibot_head": ibot})

        self.student, self.teacher = pair().to(device), pair().to(device)
        if cfg.student.drop_path_rate > 0:
            mode = "uniform" if cfg.student.drop_path_uniform else "linear"
            update_drop_path_rate(self.student.backbone.vit, drop_path_rate=cfg.student.drop_path_rate, mode=mode)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False).eval()
        self.student.train()
        self.dino_loss = DINOLoss(output_dim=cfg.dino.head_n_prototypes).to(device)
        self.ibot_loss = IBOTPatchLoss(output_dim=self.student.ibot_head.last_layer.out_features).to(device)
        self.koleo_loss = KoLeoLoss()
        decay, no_decay = get_weight_decay_parameters([self.student])
        self.opt = torch.optim.AdamW(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2),
        )
        self.cfg = cfg
        self.n_prefix = vit.num_prefix_tokens
        self.side = arch["img_size"] // arch["patch_size"]

    def prepare(self, batch: dict) -> dict:
        """Lightly's inputs from a dinoforge batch: token mask with prefix columns, block mask (B, H, W)."""
        masks = batch["collated_masks"]
        token_mask = torch.zeros(masks.shape[0], masks.shape[1] + self.n_prefix, dtype=torch.bool)
        token_mask[:, self.n_prefix :] = masks
        return {
            "global": batch["collated_global_crops"],
            "local": batch["collated_local_crops"],
            "token_mask": token_mask,
            "block_mask": masks.view(-1, self.side, self.side),
        }

    def __call__(self, batch: dict, teacher_temp: float = 0.07, momentum: float = 0.992) -> None:
        from lightly.models.utils import update_momentum

        s, t, cfg = self.student, self.teacher, self.cfg
        n_views = 2 + cfg.crops.local_crops_number
        mask = batch["token_mask"]
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_feat = t.backbone.encode(batch["global"])
            t_cls_out = t.dino_head(t_feat[:, 0])
            t_masked_out = t.ibot_head(t_feat[mask])
        s_feat = s.backbone.encode(batch["global"], mask=mask)
        s_global_cls = s_feat[:, 0]
        s_masked_out = s.ibot_head(s_feat[mask])
        s_local_cls = s.backbone.encode(batch["local"])[:, 0]
        s_cls_out = torch.cat([s.dino_head(s_global_cls), s.dino_head(s_local_cls)])
        dino = self.dino_loss(
            teacher_out=list(t_cls_out.chunk(2)), student_out=list(s_cls_out.chunk(n_views)), teacher_temp=teacher_temp
        )
        ibot = self.ibot_loss(
            teacher_out=t_masked_out, student_out=s_masked_out, mask=batch["block_mask"], teacher_temp=teacher_temp
        )
        koleo = sum(self.koleo_loss(c) for c in s_global_cls.chunk(2))
        loss = cfg.dino.loss_weight * dino + cfg.ibot.loss_weight * ibot + cfg.dino.koleo_loss_weight * koleo
        loss.backward()
        if cfg.optim.clip_grad:
            for name in ("backbone", "dino_head", "ibot_head"):
                torch.nn.utils.clip_grad_norm_(s[name].parameters(), cfg.optim.clip_grad)
        self.opt.step()
        update_momentum(s, t, m=momentum)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(spec: Spec, conn) -> None:
    """One implementation in its own process: build, then run a step per "step" message and answer its times.

    Steps of the two implementations are alternated by the parent, so both see the same machine load; a
    separate process per implementation keeps each one's peak memory its own. "done" answers the summary.
    """
    from dinoforge.train.meta_arch import backbone_kwargs

    if spec.import_lightly:  # both workers import both stacks, so their baselines are alike
        import lightly.loss
        import lightly.models.modules  # noqa: F401
    rss_baseline = _rss_mb()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(0)
    device = torch.device(spec.device)
    cfg = _config(spec)
    step = DinoforgeStep(cfg, device, **spec.options) if spec.impl == "dinoforge" else LightlyStep(cfg, device)
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


def main(
    models: Annotated[str, typer.Option(help=f"comma-separated presets: {', '.join(BENCH_MODELS)}")] = "demo,vits14",
    batch: Annotated[
        int | None, typer.Option(help="images per step (default: the preset's: demo 64, vits14 16, vitl14 8)")
    ] = None,
    steps: Annotated[int, typer.Option(help="timed steps per implementation")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up steps per implementation (same for both)")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="torch.set_num_threads in each worker (default: torch's)")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")] = "auto",
    impls: Annotated[
        str, typer.Option(help="comma-separated implementations to run: dinoforge, lightly")
    ] = "dinoforge,lightly",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="config override key=value applied to both sides (repeatable)")
    ] = None,
    out: Annotated[Path, typer.Option(help="folder for results.json")] = Path("runs/bench/train_step"),
) -> None:
    """Benchmark one DINOv2 training step of dinoforge against lightly 1.6 (same model, crops, batch, masks).

    Prints one JSON line per measurement and a ratio line per model (target in issue 4: ratio >= 1.5).
    """
    names = [m for m in models.split(",") if m]
    unknown = [m for m in names if m not in BENCH_MODELS]
    if unknown:
        raise DinoforgeError(f"unknown model preset(s) {', '.join(unknown)}; choose from {', '.join(BENCH_MODELS)}")
    chosen = [i for i in impls.split(",") if i]
    if not chosen or any(i not in IMPLS for i in chosen):
        raise DinoforgeError(f"--impls must list some of {', '.join(IMPLS)}, got {impls!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise DinoforgeError(f"--precision must be auto, fp32 or bf16, got {precision!r}")
    if steps < 1 or warmup < 0:
        raise DinoforgeError("--steps must be >= 1 and --warmup >= 0")
    if "lightly" in chosen:
        try:
            import lightly  # noqa: F401
        except ImportError:
            raise DinoforgeError("lightly is not installed: pip install 'lightly==1.6.0' (the `bench` extra)") from None
    dev = str(resolve_device(device))
    results, ratios = [], []
    for m in track(names, description="train-step benchmark"):
        specs = [
            Spec(
                i,
                m,
                batch or BENCH_MODELS[m][1],
                steps,
                warmup,
                dev,
                threads,
                precision,
                "lightly" in chosen,
                list(set_ or []),
            )
            for i in chosen
        ]
        got = {r["impl"]: r for r in measure_pair(specs)}
        for r in got.values():
            print(json.dumps(r), flush=True)
            results.append(r)
        if len(got) == 2:
            d, lt = got["dinoforge"], got["lightly"]
            line = {
                "ratio": "dinoforge/lightly img_per_s",
                "model": m,
                "batch": d["batch"],
                "device": d["device"],
                "value": d["img_per_s"] / lt["img_per_s"],
                "value_median": d["img_per_s_median"] / lt["img_per_s_median"],
                "cpu_time_ratio": lt["cpu_s_per_step"] / d["cpu_s_per_step"],
                "peak_rss_ratio": d["peak_rss_mb"] / lt["peak_rss_mb"],
                "target": 1.5,
            }
            if "peak_cuda_mb" in d:
                line["peak_cuda_ratio"] = d["peak_cuda_mb"] / lt["peak_cuda_mb"]
            print(json.dumps(line), flush=True)
            ratios.append(line)
    path = write_json(Path(out) / "results.json", {"measurements": results, "ratios": ratios, "argv": sys.argv[1:]})
    print(f"results: {path}", file=sys.stderr)


def run_cli(main_fn) -> None:
    """Run a benchmark's typer `main_fn` as a script: unbuffered output, a DinoforgeError as one `error:` line."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        typer.run(main_fn)
    except DinoforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)

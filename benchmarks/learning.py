"""Learning per CPU-minute: the demo's k-NN against training seconds, dinoforge's recipe against SSL peers.

Every runner trains the demo's ViT (the `demo` preset's student, LayerScale as its recipe resolves it) on the bundled
10k Fashion-MNIST images with the same batch and threads, and is scored by the demo's k-NN (cosine 20-NN, T 0.07,
CLS ⊕ mean patch at the global crop size, bundled train → val). For each wall-clock budget, runners go one after
the other: a short probe measures the runner's step time, its schedule is fitted to the steps that fill the budget,
and k-NN is taken at fixed fractions of the run (the clock stops while k-NN runs). Runners:

- `dinoforge`: `dinoforge train -c demo` (its data loader, augmentation, losses, schedules and init) for the fitted
  steps; `--variant NAME=key=value,key=value` adds `dinoforge:NAME` with those config overrides (e.g.
  `official_init=train.small_recipe.init=official`, the backbone drawn as the official code draws it);
- `simclr`, `vicreg`: two 24 px random-resized-crop (0.4-1) + flip views, lightly's heads and losses on CLS ⊕ mean
  patch, AdamW 1e-3 with cosine decay, on dinoforge's backbone (official init);
- `lightly_dinov2`: the DINOv2 step assembled from lightly's blocks (`lightly_step.LightlyStep`: a timm ViT that
  lightly re-initialises, xavier-uniform, with lightly's heads and losses and softmax centring) on dinoforge's
  crops and masks, with the demo recipe's schedules resolved for its own fitted step count;
  `lightly_dinov2_official_init`: the same, started from dinoforge's official init instead of lightly's re-init;
- `supervised`: cross-entropy with the labels on CLS (the ceiling, not a peer).

Every runner's clock counts its training steps only: k-NN evaluations stop it. dinoforge's clock also carries the
teacher export and reload before each k-NN: 0.11-0.17 s each for the demo's 0.8M-parameter backbone (measured on a
loaded 2-core EPYC), under 0.5 % of a 2-minute budget.

Raw pixels' k-NN is drawn as a horizontal line. Writes `learning-<date>.json` (every point, and per budget the ratio
of dinoforge's final k-NN to the best SSL peer's) and `learning.png` into --out.

    python benchmarks/learning.py --budgets 2,5,20
    python benchmarks/learning.py --budgets 5 --runners dinoforge,simclr --variant nolocal=crops.local_crops_number=0
    python benchmarks/learning.py --quick          # seconds-long budgets on a data subset: checks the harness only
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
import typer
from harness import has_lightly, run_cli

from dinoforge.config.config import load_config
from dinoforge.data.batch_augment import crop_boxes
from dinoforge.data.datasets import BundledDataset
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.eval.knn import backbone_knn_top1
from dinoforge.models.weights import build_backbone
from dinoforge.train.meta_arch import backbone_kwargs
from dinoforge.train.recipe import resolve_recipe
from dinoforge.utils import DinoforgeError, write_json

SSL_PEERS = ("simclr", "vicreg", "lightly_dinov2", "lightly_dinov2_official_init")
RUNNERS = ("dinoforge", *SSL_PEERS, "supervised")
PROBE_STEPS = (3, 8)  # warm-up steps, then timed steps of each runner's probe


@dataclass
class Bench:
    """What every runner shares: the demo config, the data, the k-NN, the threads."""

    cfg: object  # the demo preset with its recipe resolved (batch, LayerScale, crop sizes)
    images: torch.Tensor  # [N, 3, S, S] uint8, the bundled train images on the demo's canvas
    labels: torch.Tensor
    knn_specs: tuple[str, str]
    n_evals: int
    now: Callable[[], float] = time.perf_counter  # the clock of budgets: wall time, or this process's CPU time
    seed: int = 0
    eval_seconds: float = 0.0
    log: Callable[[str], None] = print

    def knn(self, backbone: torch.nn.Module) -> dict[str, float]:
        t = self.now()
        top1 = backbone_knn_top1(backbone.eval(), *self.knn_specs, k=20, image_size=self.cfg.crops.global_crops_size)
        self.eval_seconds += self.now() - t
        return top1


class Clock:
    """Training seconds on the bench's clock: time since start, less the time spent in k-NN evaluations."""

    def __init__(self, bench: Bench):
        self.bench, self.start, self.eval_at_start = bench, bench.now(), bench.eval_seconds

    def __call__(self) -> float:
        return self.bench.now() - self.start - (self.bench.eval_seconds - self.eval_at_start)


def _point(clock: Clock, step: int, top1: dict[str, float]) -> dict:
    return {
        "train_s": round(clock(), 2),
        "step": step,
        "knn": round(top1["cls+avgpool"] / 100, 4),
        "knn_cls": round(top1["cls"] / 100, 4),
    }


# ---------------------------------------------------------------------------------------------- dinoforge runner


def run_dinoforge(bench: Bench, budget_s: float, overrides: list[str]) -> dict:
    """`train()` on the demo preset (+ overrides) for the steps that fill `budget_s`, k-NN at its periodic evals."""
    from dinoforge.train.loop import train

    def config(steps: int, period: int) -> object:
        return load_config(
            "demo",
            [
                *overrides,
                f"train.max_iterations={steps}",
                f"evaluation.eval_period_iterations={period}",
                f"train.checkpoint_period_iterations={steps}",
                f"train.seed={bench.seed}",
            ],
        )

    warm, timed = PROBE_STEPS
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = bench.now()
        train(
            config(warm + timed + 2, 1),
            Path(tmp),
            data="bundled:train",
            quiet=True,
            evaluate=lambda _: stamps.append(bench.now()) or {},
        )
    step_s = (stamps[warm + timed - 1] - stamps[warm - 1]) / timed
    overhead = max(stamps[0] - t0 - step_s, 0.0)  # build, loader start-up, first batch
    period = max(1, int((budget_s - overhead) / step_s) // bench.n_evals)  # k-NN after each n_evals-th of the run
    steps = period * bench.n_evals
    points: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        clock = Clock(bench)
        counter = iter(range(period - 1, 10**9, period))

        def evaluate(backbone: torch.nn.Module) -> dict[str, float]:
            step = min(next(counter), steps - 1)
            top1 = bench.knn(backbone)
            points.append(_point(clock, step + 1, top1))
            return {f"knn_top1_{k}": v for k, v in top1.items()}

        train(config(steps, period), Path(tmp), data="bundled:train", quiet=True, evaluate=evaluate)
    return {"steps": steps, "probe_step_s": round(step_s, 4), "points": points}


# ---------------------------------------------------------------------------------------------- peers


def two_views(images: torch.Tensor, size: int, gen: torch.Generator, scale=(0.4, 1.0)) -> torch.Tensor:
    """Two random-resized crops (torchvision's box sampler, bilinear) + flips per uint8 image → [2B, 3, size, size]
    normalised float."""
    x = images.float().div_(255).repeat(2, 1, 1, 1)
    n, _, h, w = x.shape
    boxes = crop_boxes(
        torch.full((n,), h), torch.full((n,), w), scale, torch.rand(n, 22, generator=gen, dtype=torch.float64)
    )
    top, left, bh, bw = boxes.double().unbind(1)
    # an affine grid per crop: the box's centre and half-size in [-1, 1] coordinates of the source image
    cx, cy = (left + bw / 2) / w * 2 - 1, (top + bh / 2) / h * 2 - 1
    sx, sy = bw / w, bh / h
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx * flip, cx, sy, cy
    grid = F.affine_grid(theta.float(), [n, 3, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (out - mean) / std


def pooled(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLS ⊕ mean patch token: the features the demo's k-NN reads."""
    out = backbone.forward_features(x)
    return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=1)


class PeerStep:
    """One optimisation step of a peer; `lr_at(progress)` sets its schedule. Subclasses define `loss(batch)`."""

    lr = 1e-3
    weight_decay = 0.05

    def __init__(self, bench: Bench, steps: int):
        torch.manual_seed(bench.seed)
        self.bench = bench
        self.backbone = build_backbone(backbone_kwargs(bench.cfg))
        self.gen = torch.Generator().manual_seed(bench.seed)
        self.modules = torch.nn.ModuleList([self.backbone, *self.heads()])
        self.opt = torch.optim.AdamW(self.modules.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def heads(self) -> list[torch.nn.Module]:
        return []

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(
            0, len(self.bench.images), (int(self.bench.cfg.train.batch_size_per_gpu),), generator=self.gen
        )
        return self.bench.images[idx], self.bench.labels[idx]

    def __call__(self, progress: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        self.modules.train()
        loss = self.loss(*self.batch())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model(self) -> torch.nn.Module:
        return self.backbone


class TwoViewStep(PeerStep):
    """Two views of each image, a projection head on CLS ⊕ mean patch, a loss between the two projections."""

    def heads(self) -> list[torch.nn.Module]:
        self.head, self.criterion = self.head_and_loss(2 * self.backbone.embed_dim)
        return [self.head]

    @staticmethod
    def head_and_loss(dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        raise NotImplementedError

    def loss(self, images, labels):
        views = two_views(images, self.bench.cfg.crops.global_crops_size, self.gen)
        a, b = self.head(pooled(self.backbone, views)).chunk(2)
        return self.criterion(a, b)


class SimCLRStep(TwoViewStep):
    """SimCLR: NT-Xent (τ 0.2) between the projections (2-layer head to 128) of two views."""

    @staticmethod
    def head_and_loss(dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        return SimCLRProjectionHead(dim, dim, 128), NTXentLoss(temperature=0.2)


class VICRegStep(TwoViewStep):
    """VICReg: invariance, variance and covariance terms on 3-layer expander outputs (512 wide) of two views."""

    @staticmethod
    def head_and_loss(dim: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        from lightly.loss import VICRegLoss
        from lightly.models.modules.heads import VICRegProjectionHead

        return VICRegProjectionHead(dim, 512, 512, num_layers=3), VICRegLoss()


class SupervisedStep(PeerStep):
    """The ceiling: cross-entropy with the labels on the CLS token of one view."""

    def heads(self) -> list[torch.nn.Module]:
        self.head = torch.nn.Linear(self.backbone.embed_dim, len(BundledDataset.classes))
        return [self.head]

    def loss(self, images, labels):
        views = two_views(images, self.bench.cfg.crops.global_crops_size, self.gen)[: len(images)]
        return F.cross_entropy(self.head(self.backbone.forward_features(views)["x_norm_clstoken"]), labels)


class LightlyDinoStep(PeerStep):
    """lightly's DINOv2 step (`lightly_step.LightlyStep`: a timm ViT with lightly's heads and losses, softmax centring)
    on dinoforge's crops and masks (`train.data.crops_and_masks`), with the demo recipe's schedules (lr, weight
    decay, EMA momentum, teacher temperature) resolved for this runner's own step count. lightly re-initialises the
    timm ViT (xavier-uniform Linear and patch embedding, CLS N(0, 0.02)); `dinoforge_init` starts it from the
    official init that dinoforge's backbone draws instead."""

    dinoforge_init = False

    def __init__(self, bench: Bench, steps: int):
        from lightly_step import LightlyStep

        from dinoforge.data.datasets import BundledDataset
        from dinoforge.models.formats.timm import official_to_timm
        from dinoforge.train.data import SeededAugment, crops_and_masks
        from dinoforge.train.schedules import build_schedulers

        cfg = load_config("demo", [f"train.max_iterations={steps}", f"train.seed={bench.seed}"])
        resolve_recipe(cfg, len(bench.images))
        self.bench, self.cfg, self.schedules, self.it = bench, cfg, build_schedulers(cfg), 0
        torch.manual_seed(bench.seed)
        self.gen = torch.Generator().manual_seed(bench.seed)
        self.step = LightlyStep(cfg, torch.device("cpu"))
        if self.dinoforge_init:
            official = build_backbone(backbone_kwargs(cfg)).state_dict()
            timm_sd = {k: v for k, v in official_to_timm(official).items() if k != "mask_token"}
            for side in (self.step.student, self.step.teacher):
                side.backbone.vit.load_state_dict(timm_sd)
        transform, self.collate = crops_and_masks(cfg)
        self.data = SeededAugment(BundledDataset("train", size=32), transform)

    def __call__(self, progress: float) -> None:
        s, it = self.schedules, min(self.it, len(self.schedules.lr) - 1)
        for g in self.step.opt.param_groups:
            g["lr"] = s.lr[it]
            if g.get("weight_decay", 0.0) > 0:
                g["weight_decay"] = s.wd[it]
        idx = torch.randint(0, len(self.data), (int(self.cfg.train.batch_size_per_gpu),), generator=self.gen)
        seeds = torch.randint(0, 2**62, (len(idx),), generator=self.gen)
        batch = self.collate.finish(
            self.collate([self.data[(int(i), int(k))] for i, k in zip(idx, seeds, strict=True)])
        )
        self.step(self.step.prepare(batch), teacher_temp=float(s.teacher_temp[it]), momentum=float(s.momentum[it]))
        self.it += 1

    def model(self) -> torch.nn.Module:
        """lightly's teacher (a timm ViT) as the dinoforge backbone the k-NN reads, through the timm key map."""
        from dinoforge.models.formats.timm import timm_to_official
        from dinoforge.models.weights import load_state_dict_strict

        net = build_backbone(backbone_kwargs(self.cfg))
        sd = timm_to_official(self.step.teacher.backbone.vit.state_dict())
        sd.setdefault("mask_token", net.mask_token.detach())  # lightly keeps its mask token outside the ViT
        load_state_dict_strict(net, sd, source="lightly teacher")
        return net


class LightlyDinoFromDinoforgeInit(LightlyDinoStep):
    """lightly's DINOv2 step started from dinoforge's official init instead of lightly's re-init."""

    dinoforge_init = True


PEERS: dict[str, type[PeerStep]] = {
    "simclr": SimCLRStep,
    "vicreg": VICRegStep,
    "lightly_dinov2": LightlyDinoStep,
    "lightly_dinov2_official_init": LightlyDinoFromDinoforgeInit,
    "supervised": SupervisedStep,
}


def run_peer(bench: Bench, budget_s: float, name: str) -> dict:
    """Probe the peer's step time on a throw-away model, fit its schedule to the budget, train, k-NN at fractions."""
    warm, timed = PROBE_STEPS
    probe = PEERS[name](bench, warm + timed)
    for i in range(warm + timed):
        if i == warm:
            t = bench.now()
        probe(0.0)
    step_s = (bench.now() - t) / timed
    steps = max(bench.n_evals, int(budget_s / step_s))
    clock = Clock(bench)
    step = PEERS[name](bench, steps)  # a DINO peer's schedules are resolved for `steps`
    marks = {round(steps * (i + 1) / bench.n_evals) for i in range(bench.n_evals)}
    points = []
    for i in range(steps):
        step(i / steps)
        if i + 1 in marks:
            points.append(_point(clock, i + 1, bench.knn(step.model())))
    return {"steps": steps, "probe_step_s": round(step_s, 4), "points": points}


# ---------------------------------------------------------------------------------------------- harness


def _bench(quick: bool, n_evals: int, threads: int, log) -> Bench:
    cfg = load_config("demo", [])
    data = BundledDataset("train", size=32)
    resolve_recipe(cfg, len(data))
    images = torch.from_numpy(np.stack([np.asarray(data.pil(i)) for i in range(len(data))])).permute(0, 3, 1, 2)
    specs = ("bundled:train", "bundled:val")
    if quick:  # a 2000 → 500 k-NN from labelled file lists of bundled items
        tmp = Path(tempfile.mkdtemp(prefix="learning_quick_"))
        for split, n in (("train", 2000), ("val", 500)):
            labels = data.labels if split == "train" else BundledDataset("val").labels
            (tmp / f"{split}.txt").write_text("".join(f"bundled:{split}/{i}\t{labels[i]}\n" for i in range(n)))
        specs = (str(tmp / "train.txt"), str(tmp / "val.txt"))
    torch.set_num_threads(threads)
    return Bench(cfg, images.contiguous(), torch.from_numpy(data.labels).long(), specs, n_evals, log=log)


def plot(result: dict, path: Path) -> Path:
    """k-NN against training seconds, one line per runner and budget, raw pixels as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {}
    for runs in result["budgets"].values():
        for name, run in runs.items():
            pts = run["points"]
            first = name not in colours  # the legend names each runner once, whichever budget it first ran
            colour = colours.setdefault(name, plt.get_cmap("tab20")(len(colours) % 20))
            ax.plot(
                [p["train_s"] for p in pts], [p["knn"] for p in pts], "o-", color=colour, label=name if first else None
            )
    ax.axhline(result["raw_pixels"], color="k", ls="--", label="raw pixels")
    ax.set_xlabel(f"training seconds, {result.get('clock', 'wall')} clock (k-NN time excluded)")
    ax.set_ylabel("k-NN top-1 (cosine 20-NN, CLS ⊕ mean patch)")
    ax.set_title("Learning per CPU-minute: demo ViT, bundled Fashion-MNIST 10k → 2k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def ratios(result: dict) -> dict:
    """Per budget: dinoforge's final k-NN against the best SSL peer's (lightly's DINOv2, SimCLR, VICReg)."""
    out = {}
    for key, runs in result["budgets"].items():
        finals = {n: r["points"][-1]["knn"] for n, r in runs.items()}
        peers = {n: v for n, v in finals.items() if n in SSL_PEERS}
        if "dinoforge" in finals and peers:
            best = max(peers, key=peers.get)
            out[key] = {
                "dinoforge": finals["dinoforge"],
                "best_peer": best,
                "best_peer_knn": peers[best],
                "ratio": round(finals["dinoforge"] / peers[best], 4),
                "points_over_best_peer": round(100 * (finals["dinoforge"] - peers[best]), 2),
            }
    return out


def combine(files: list[Path], out: Path) -> None:
    """Merge the runs of several invocations (e.g. one runner each, run side by side on the CPU clock)."""
    parts = [json.loads(f.read_text()) for f in files]
    result = {**parts[0], "budgets": {}, "variants": {}, "combined_from": [str(f) for f in files]}
    for part in parts:
        if (part["clock"], part["threads"], part["quick"]) != (result["clock"], result["threads"], result["quick"]):
            raise DinoforgeError(f"{len(files)} results of different clocks, threads or --quick cannot be combined")
        result["variants"].update(part["variants"])
        for key, runs in part["budgets"].items():
            result["budgets"].setdefault(key, {}).update(runs)
    finish(result, out)


def finish(result: dict, out: Path) -> None:
    """Ratios, the figure and the JSON of a finished result."""
    result["ratio_dinoforge_to_best_peer"] = ratios(result)
    for key, ratio in result["ratio_dinoforge_to_best_peer"].items():
        print(json.dumps({"budget": key, **ratio}), flush=True)
    result["figure"] = str(plot(result, out / "learning.png"))
    path = out / f"learning-{result['date']}.json"
    write_json(path, result)
    print(f"results in {path} and {result['figure']}")


def main(
    budgets: Annotated[
        str, typer.Option("--budgets", help="Comma-separated budgets in minutes on --clock, each run by every runner.")
    ] = "2,5,20",
    runners: Annotated[str, typer.Option(help=f"Comma-separated runners: {', '.join(RUNNERS)}.")] = ",".join(RUNNERS),
    variant: Annotated[
        list[str], typer.Option("--variant", help="NAME=key=value,key=value: a dinoforge runner with config overrides.")
    ] = [],  # noqa: B006
    evals: Annotated[int, typer.Option(min=1, help="k-NN evaluations per run, at equal fractions of it.")] = 4,
    threads: Annotated[int, typer.Option(min=1, help="torch threads of every runner.")] = 2,
    clock: Annotated[
        str,
        typer.Option(
            help="wall: wall-clock budgets (a quiet machine); cpu: this process's CPU time (a shared machine: "
            "use --threads 1; dinoforge then augments in-process, so its loader's CPU time counts too)."
        ),
    ] = "wall",
    quick: Annotated[bool, typer.Option(help="Budgets of seconds and a 2000 → 500 k-NN: tests the harness.")] = False,
    combine_files: Annotated[
        list[Path], typer.Option("--combine", help="Merge these result JSONs into --out instead of running.")
    ] = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("benchmarks/results"),
) -> None:
    """k-NN against training seconds at equal budgets: dinoforge's recipe against SSL peers."""
    out.mkdir(parents=True, exist_ok=True)
    if combine_files:
        return combine(combine_files, out)
    chosen = [r.strip() for r in runners.split(",") if r.strip()]
    unknown = sorted(set(chosen) - set(RUNNERS))
    if unknown:
        raise DinoforgeError(f"unknown runner(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    if clock not in CLOCKS:
        raise DinoforgeError(f"--clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    named = {}
    for v in variant:
        name, _, overrides = v.partition("=")
        if not name or not overrides:
            raise DinoforgeError(f"--variant takes NAME=key=value[,key=value], got {v!r}")
        named[f"dinoforge:{name}"] = overrides.split(",")
    try:
        minutes_list = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise DinoforgeError(f"--budgets takes comma-separated minutes, e.g. 2,5,20; got {budgets!r}") from None
    if quick:
        minutes_list, evals = [0.25], 2
    bench = _bench(quick, evals, threads, log=lambda s: print(s, flush=True))
    bench.now = CLOCKS[clock]
    in_process = ["train.num_workers=0"] if clock == "cpu" else []  # the CPU clock sees this process only
    from dinoforge.demo import raw_pixel_knn

    result = {
        "date": date.today().isoformat(),
        "machine": _machine(),
        "clock": clock,
        "threads": threads,
        "quick": quick,
        "batch": int(bench.cfg.train.batch_size_per_gpu),
        "knn": {"train": bench.knn_specs[0], "val": bench.knn_specs[1], "k": 20, "features": "cls+avgpool"},
        "raw_pixels": round(raw_pixel_knn() / 100, 4),
        "variants": named,
        "budgets": {},
    }
    path = out / f"learning-{result['date']}.json"
    for minutes in minutes_list:
        key = f"{minutes:g}min"
        runs = result["budgets"].setdefault(key, {})
        for name in [*chosen, *named]:
            if name in PEERS and name != "supervised" and not has_lightly():
                bench.log(f"[{key}] {name}: skipped (lightly is not installed: pip install 'lightly==1.6.0')")
                continue
            t = time.perf_counter()
            if name.startswith("dinoforge"):
                runs[name] = run_dinoforge(bench, minutes * 60, [*named.get(name, []), *in_process])
            else:
                runs[name] = run_peer(bench, minutes * 60, name)
            runs[name]["wall_s"] = round(time.perf_counter() - t, 1)
            runs[name]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)  # other jobs on the machine
            print(json.dumps({"budget": key, "runner": name, **runs[name]}), flush=True)
            write_json(path, result)
    finish(result, out)


def _machine() -> str:
    """The CPU model and its vector extensions (the kernels a run's timings depend on)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(ext)}), {torch.get_num_threads()} threads"


if __name__ == "__main__":
    run_cli(main)

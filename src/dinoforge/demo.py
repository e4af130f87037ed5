"""`dinoforge demo`: pretrain on the bundled data, evaluate k-NN against baselines, visualise, summarise."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dinoforge.config.config import load_config
from dinoforge.data.datasets import BundledDataset
from dinoforge.eval.knn import backbone_knn_top1, knn_callback, knn_evaluate
from dinoforge.models.weights import build_backbone, load_backbone
from dinoforge.train.loop import train
from dinoforge.train.schedules import total_iterations
from dinoforge.utils import eprint, write_json

KNN_K = 20
FEATURES = "cls+avgpool"  # the headline k-NN features; summary.json has the CLS-only figures too


def raw_pixel_knn(k: int = KNN_K, full: bool = False) -> float:
    """The baseline to beat: cosine k-NN top-1 (%) on the raw 28×28 pixels, bundled train → bundled val
    (`full`: the whole Fashion-MNIST, 60k train → 10k test, when its Debian package is installed)."""
    tr, va = BundledDataset("train", full=full), BundledDataset("val", full=full)
    flat = lambda ds: torch.from_numpy(ds.images.reshape(len(ds), -1).astype(np.float32))  # noqa: E731
    res = knn_evaluate(flat(tr), torch.from_numpy(tr.labels), flat(va), torch.from_numpy(va.labels), ks=(k,))
    return res["full"][f"k={k}"]["top1"]


def run_demo(output_dir: Path, overrides: list[str], epochs: int | None = None) -> dict:
    """The main job of `make demo`; returns (and writes) summary.json. `epochs` replaces the preset's 2 epochs."""
    from rich.console import Console
    from rich.table import Table

    from dinoforge.viz.pca import pca_figure

    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    cfg = load_config("demo", [*overrides, *([f"optim.epochs={epochs}"] if epochs else [])])
    size = cfg.crops.global_crops_size
    eprint(
        f"[demo] pretraining a ViT (dim {cfg.student.embed_dim}, depth {cfg.student.depth}, patch "
        f"{cfg.student.patch_size}) on the bundled Fashion-MNIST subset for {total_iterations(cfg)} steps, "
        f"k-NN every {cfg.evaluation.eval_period_iterations} steps"
    )
    periodic = knn_callback("bundled:train", "bundled:val", k=KNN_K, image_size=size)
    summary_train = train(cfg, output_dir / "train", data="bundled:train", evaluate=periodic)
    t_train = time.perf_counter() - t0

    eprint("[demo] k-NN evaluation (k=20, cosine, T=0.07): trained teacher, random init, raw pixels")
    trained = load_backbone(summary_train["teacher"])
    torch.manual_seed(cfg.train.seed)
    random_init = build_backbone(trained.arch)
    if cfg.student.init != "official":  # as SSLMetaArch draws it: the very weights the teacher started from
        random_init.init_weights(cfg.student.init)
    # evaluated at the global crop size, the resolution the model was trained at (as official: 224 px); the trained
    # teacher's k-NN is the training's final evaluation (the same callback)
    knn_trained = {k.removeprefix("knn_top1_"): v for k, v in summary_train["eval"].items()}
    knn_random = backbone_knn_top1(random_init, k=KNN_K, image_size=size)
    acc_trained, acc_random = knn_trained[FEATURES] / 100, knn_random[FEATURES] / 100
    acc_pixels = raw_pixel_knn() / 100

    eprint("[demo] PCA-of-patch-features figure")
    val = BundledDataset("val", size=size)
    images = [val[i][0] for i in range(16)]
    fig = pca_figure(trained, images, output_dir / "pca_patch_features.png")

    summary = {
        "knn_top1_trained": acc_trained,
        "knn_top1_random_init": acc_random,
        "knn_top1_raw_pixels": acc_pixels,
        "knn_k": KNN_K,
        "knn_features": FEATURES,
        "knn_top1_by_features": {"trained": knn_trained, "random_init": knn_random},
        "train_iterations": summary_train["iterations"],
        "train_wall_time_s": t_train,
        "train_images_per_s": summary_train["last"].get("images_per_s"),
        "step_images_per_s": summary_train["last"].get("step_images_per_s"),
        "final_losses": {k: v for k, v in summary_train["last"].items() if "loss" in k},
        "final_teacher_entropy": summary_train["last"].get("teacher_entropy"),
        "final_teacher_cls_std": summary_train["last"].get("teacher_cls_std"),
        "train_warnings": summary_train["warnings"],
        "curves": summary_train.get("curves"),
        "teacher_backbone": summary_train["teacher"],
        "pca_figure": str(fig),
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json(output_dir / "summary.json", summary)

    table = Table(title="dinoforge demo: k-NN top-1 on the bundled Fashion-MNIST validation split")
    table.add_column("features")
    table.add_column(f"top-1, {FEATURES}", justify="right")
    table.add_column("top-1, CLS only", justify="right")
    table.add_row("raw pixels", f"{acc_pixels:.4f}", "")
    table.add_row("ViT, random init", f"{acc_random:.4f}", f"{knn_random['cls'] / 100:.4f}")
    table.add_row("ViT, DINOv2-pretrained (teacher)", f"{acc_trained:.4f}", f"{knn_trained['cls'] / 100:.4f}")
    console = Console()
    console.print(table)
    console.print(
        f"trained at {summary['train_images_per_s']:.0f} images/s on this machine (the step alone: "
        f"{summary['step_images_per_s']:.0f}); wall time {summary['wall_time_s']:.0f} s; results in "
        f"{output_dir.resolve()}"
    )
    console.print(
        "  summary.json, pca_patch_features.png, train/ (curves.png, metrics.csv, checkpoints/, "
        "teacher_backbone.safetensors)"
    )
    return summary

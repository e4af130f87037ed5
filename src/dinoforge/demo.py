"""`dinoforge demo`: pretrain on the bundled data, evaluate k-NN against baselines, visualise, summarise."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dinoforge.config.config import load_config
from dinoforge.data.datasets import BundledDataset
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.embed import extract_features
from dinoforge.eval.knn import knn_evaluate
from dinoforge.models.weights import build_backbone, load_backbone
from dinoforge.train.loop import train
from dinoforge.utils import eprint, write_json

KNN_K = 20


def _normalize_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def knn_top1(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, k: int = KNN_K) -> float:
    """Cosine, temperature-weighted k-NN top-1 accuracy (fraction)."""
    res = knn_evaluate(
        torch.from_numpy(np.ascontiguousarray(train_x)).float(),
        torch.from_numpy(train_y).long(),
        torch.from_numpy(np.ascontiguousarray(val_x)).float(),
        torch.from_numpy(val_y).long(),
        ks=(k,),
    )
    return res["full"][f"k={k}"]["top1"] / 100.0


def backbone_knn(backbone: torch.nn.Module, size: int, device: str = "cpu") -> float:
    """k-NN top-1 of a backbone's CLS features, bundled train → bundled val."""
    feats = {}
    for split in ("train", "val"):
        ds = BundledDataset(split, transform=_normalize_transform(), size=size)
        out = extract_features(backbone, ds, batch_size=256, device=device, desc=f"features {split}")
        feats[split] = (out["cls"], out["labels"])
    return knn_top1(*feats["train"], *feats["val"])


def raw_pixel_knn(size: int) -> float:
    """The baseline to beat: k-NN on raw pixels (cosine), bundled train → bundled val."""
    tr, va = BundledDataset("train", size=size), BundledDataset("val", size=size)
    flat = lambda ds: np.stack([np.asarray(ds[i][0].convert("L"), np.float32).ravel() for i in range(len(ds))])  # noqa: E731
    return knn_top1(flat(tr), tr.labels, flat(va), va.labels)


def run_demo(output_dir: Path, overrides: list[str]) -> dict:
    """The main job of `make demo`; returns (and writes) summary.json."""
    from rich.console import Console
    from rich.table import Table

    from dinoforge.viz.pca import pca_figure

    t0 = time.perf_counter()
    output_dir = Path(output_dir)
    cfg = load_config("demo", overrides)
    size = cfg.crops.global_crops_size
    steps = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    eprint(
        f"[demo] pretraining a ViT (dim {cfg.student.embed_dim}, depth {cfg.student.depth}, patch "
        f"{cfg.student.patch_size}) on the bundled Fashion-MNIST subset for {steps} steps"
    )
    summary_train = train(cfg, output_dir / "train", data="bundled:train")
    t_train = time.perf_counter() - t0

    eprint("[demo] k-NN evaluation (k=20, cosine, T=0.07): trained teacher, random init, raw pixels")
    trained = load_backbone(summary_train["teacher"])
    torch.manual_seed(cfg.train.seed)
    random_init = build_backbone(trained.arch)
    acc_trained = backbone_knn(trained, size)
    acc_random = backbone_knn(random_init, size)
    acc_pixels = raw_pixel_knn(size)

    eprint("[demo] PCA-of-patch-features figure")
    val = BundledDataset("val", size=size)
    images = [val[i][0] for i in range(16)]
    fig = pca_figure(trained, images, output_dir / "pca_patch_features.png")

    summary = {
        "knn_top1_trained": acc_trained,
        "knn_top1_random_init": acc_random,
        "knn_top1_raw_pixels": acc_pixels,
        "knn_k": KNN_K,
        "train_iterations": summary_train["iterations"],
        "train_wall_time_s": t_train,
        "final_losses": {k: v for k, v in summary_train["last"].items() if "loss" in k},
        "teacher_backbone": summary_train["teacher"],
        "pca_figure": str(fig),
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json(output_dir / "summary.json", summary)

    table = Table(title="dinoforge demo: k-NN top-1 on the bundled Fashion-MNIST validation split")
    table.add_column("features")
    table.add_column("top-1", justify="right")
    table.add_row("raw pixels", f"{acc_pixels:.4f}")
    table.add_row("ViT, random init", f"{acc_random:.4f}")
    table.add_row("ViT, DINOv2-pretrained (teacher)", f"{acc_trained:.4f}")
    console = Console()
    console.print(table)
    console.print(f"wall time {summary['wall_time_s']:.0f} s; results in {output_dir.resolve()}")
    console.print(
        "  summary.json, pca_patch_features.png, train/ (metrics.csv, checkpoints/, teacher_backbone.safetensors)"
    )
    return summary

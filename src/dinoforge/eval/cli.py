"""`dinoforge eval ...`: frozen-backbone evaluations. Each command loads the backbone from its options and
calls its evaluation's run_*_eval function, which writes the metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from dinoforge.cli_common import BatchOpt, DeviceOpt, ModelOpt, OutOpt, RandomInitOpt, WeightsOpt
from dinoforge.data.datasets import report_skipped
from dinoforge.eval.depth import run_depth_eval
from dinoforge.eval.features import model_fingerprint
from dinoforge.eval.knn import run_knn_eval, torchrun_shard
from dinoforge.eval.linear import DEFAULT_LRS, run_linear_eval
from dinoforge.eval.logreg import run_logreg_eval
from dinoforge.eval.retrieval import ground_truth_images, run_labelled_retrieval_eval, run_revisitop_eval
from dinoforge.eval.segmentation import run_seg_eval
from dinoforge.eval.video import run_video_eval
from dinoforge.models.hub import weights_source
from dinoforge.models.weights import load_model
from dinoforge.utils import DinoforgeError, resolve_device

TrainDataOpt = Annotated[
    str,
    typer.Option(
        "--train-data", help="Train images: bundled:train, an ImageFolder tree, a file list or shards (s/{0..9}.tar)."
    ),
]
ValDataOpt = Annotated[str, typer.Option("--val-data", help="Test images, same forms as --train-data.")]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        min=1,
        help="Eval side in px: centre crop (after resize side*256/224) for folders, canvas for bundled. "
        "Default: 224 for folders, the native 32 px (rounded to the patch) for the bundled set.",
    ),
]
CacheOpt = Annotated[
    bool,
    typer.Option("--cache/--no-cache", help="Reuse cached features of the same backbone + data + transform."),
]


def _backbone(
    model: str | None, weights: Path | None, random_init: bool, device: str, fingerprint: bool = True
) -> tuple[torch.nn.Module, str | None]:
    """The backbone of --model/--weights/--random-init on --device, and its cache fingerprint (when asked): that of
    its weights file (for a hub name, the cached file it was loaded from), else of its state dict."""
    net = load_model(model, weights, device, random_init)
    if not fingerprint:
        return net, None
    return net, model_fingerprint(net, weights_source(model, weights, random_init))


def _parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DinoforgeError(f"--ms-scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise DinoforgeError(f"--ms-scales must be positive numbers, got {text!r}")
    return scales


def knn_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    train_data: TrainDataOpt = "bundled:train",
    val_data: ValDataOpt = "bundled:val",
    out: OutOpt = Path("runs/eval_knn"),
    ks: list[int] = typer.Option([10, 20, 100, 200], "--k", min=1, help="Numbers of neighbours (repeat the option)."),
    temperature: float = typer.Option(
        0.07, "--temperature", "-T", min=1e-6, help="Vote temperature: weight exp(sim/T)."
    ),
    n_per_class: list[int] = typer.Option(
        [], "--n-per-class", min=1, help="Few-shot: train images per class (repeat)."
    ),
    n_tries: int = typer.Option(1, "--n-tries", min=1, help="Random few-shot subsets (seeds) per n."),
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """k-NN classification of frozen CLS features (cosine, temperature-weighted vote), top-1/top-5 per k.

    Under torchrun the train features are sharded across ranks. Writes metrics.json into --out and prints
    the folder.
    """
    shard = torchrun_shard(device)  # before loading: under torchrun it picks this rank's GPU
    net, fingerprint = _backbone(model, weights, random_init, device)
    metrics = run_knn_eval(
        net, fingerprint, train_data, val_data, out, ks=ks, temperature=temperature, n_per_class=n_per_class,
        n_tries=n_tries, image_size=image_size, batch_size=batch_size, use_cache=cache, shard=shard,
    )  # fmt: skip
    if metrics is None:  # a rank other than 0
        return
    for name, val in metrics["full"].items():
        print(f"{name}: top1 {val['top1']:.2f}  top5 {val['top5']:.2f}")
    print(out)
    report_skipped(metrics)


def linear_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    train_data: TrainDataOpt = "bundled:train",
    val_data: ValDataOpt = "bundled:val",
    out: OutOpt = Path("runs/eval_linear"),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the cached train features."),
    head_batch_size: int = typer.Option(256, "--head-batch-size", min=1, help="Features per SGD step."),
    lrs: list[float] = typer.Option(list(DEFAULT_LRS), "--lr", help="Learning-rate grid (repeat the option)."),
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Linear probe: heads on last 1/4 blocks' CLS ± avgpooled patches × lr grid; best on a held-out 10%.

    Writes metrics.json (best head and every head) into --out and prints the folder.
    """
    net, fingerprint = _backbone(model, weights, random_init, device)
    metrics = run_linear_eval(
        net, fingerprint, train_data, val_data, out, lrs=lrs, epochs=epochs, head_batch_size=head_batch_size,
        image_size=image_size, batch_size=batch_size, device=device, use_cache=cache,
    )  # fmt: skip
    print(f"linear top1 {metrics['top1']:.2f} (best head {metrics['best_head']})")
    print(out)
    report_skipped(metrics)


def logreg_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    train_data: TrainDataOpt = "bundled:train",
    val_data: ValDataOpt = "bundled:val",
    out: OutOpt = Path("runs/eval_logreg"),
    n_c: int = typer.Option(45, "--n-c", min=1, help="Number of C values, log-spaced in 1e-6 .. 1e5."),
    max_iter: int = typer.Option(1000, "--max-iter", min=1, help="L-BFGS iterations per fit."),
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Logistic regression (L-BFGS) on frozen CLS features, C chosen on a held-out 10% of train.

    Writes metrics.json into --out and prints the folder.
    """
    net, fingerprint = _backbone(model, weights, random_init, device)
    metrics = run_logreg_eval(
        net, fingerprint, train_data, val_data, out, n_c=n_c, max_iter=max_iter, image_size=image_size,
        batch_size=batch_size, use_cache=cache,
    )  # fmt: skip
    print(f"logreg top1 {metrics['top1']:.2f} (C={metrics['best_C']:.3g})")
    print(out)
    report_skipped(metrics)


def retrieval_command(
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    gnd: Path | None = typer.Option(
        None, "--gnd", help="Ground truth: official gnd_roxford5k.pkl / gnd_rparis6k.pkl (query boxes) or JSON."
    ),
    images: Path | None = typer.Option(None, "--images", help="Root folder of the --gnd image paths."),
    data: str = typer.Option("bundled:val", "--data", help="Labelled images for generic retrieval (no --gnd)."),
    out: OutOpt = Path("runs/eval_retrieval"),
    image_size: ImageSizeOpt = None,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Instance retrieval on frozen CLS features: revisited Oxford/Paris mAP or labelled mAP/recall@k.

    With --gnd: Easy/Medium/Hard mAP; otherwise every --data image queries the others. Writes metrics.json.
    """
    opts = dict(image_size=image_size, batch_size=batch_size, use_cache=cache)
    if gnd is not None:
        gt, path_lists = ground_truth_images(gnd, images)  # checked before the backbone is loaded
        net, fingerprint = _backbone(model, weights, random_init, device)
        metrics = run_revisitop_eval(net, fingerprint, gt, path_lists, out, **opts)
        line = "  ".join(f"{k} mAP {v:.2f}" for k, v in metrics["mAP"].items())
    else:
        net, fingerprint = _backbone(model, weights, random_init, device)
        metrics = run_labelled_retrieval_eval(net, fingerprint, data, out, **opts)
        line = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))
    print(line)
    print(out)
    report_skipped(metrics)


def seg_command(
    train_data: Annotated[Path, typer.Option("--train-data", help="Folder with images/ and masks/ (same stems).")],
    val_data: Annotated[Path, typer.Option("--val-data", help="Validation folder, same layout as --train-data.")],
    out: OutOpt = Path("runs/eval_seg"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", min=1, help="Classes (default: 1 + largest id in train masks)."),
    ] = None,
    layers: Annotated[int, typer.Option("--layers", min=1, help="1 = last block (lin.), 4 = last four (+ms).")] = 1,
    size: Annotated[int, typer.Option("--size", min=1, help="Square side the images are resized to.")] = 448,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the cached train features.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate.")] = 1e-3,
    ms_scales: Annotated[
        str,
        typer.Option("--ms-scales", help="Test scales, e.g. 1.0,1.32,1.73,2.28,3.0 (paper's +ms); averaged."),
    ] = "1.0",
    flip: Annotated[
        bool, typer.Option("--flip/--no-flip", help="Also average horizontally flipped test views.")
    ] = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Semantic segmentation linear probe: BN + 1x1 conv on frozen patch tokens, mIoU and per-class IoU.

    Layout: DIR/images/<stem>.jpg|png and DIR/masks/<stem>.png (pixel = class id, 255 = ignore).
    Writes metrics.json, head.pt and predictions.png (a few val images) into --out.
    """
    backbone, fingerprint = _backbone(model, weights, random_init, device, fingerprint=cache)
    result = run_seg_eval(
        backbone,
        train_data,
        val_data,
        out,
        num_classes=num_classes,
        layers=layers,
        size=size,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        scales=_parse_scales(ms_scales),
        flip=flip,
        device=resolve_device(device),
        fingerprint=fingerprint,
    )
    print(f"mIoU {100 * result['miou']:.2f}  pixel acc {100 * result['pixel_acc']:.2f}")
    print(f"results in {out}")


def depth_command(
    train_data: Annotated[Path, typer.Option("--train-data", help="Folder with images/ and depth/ (same stems).")],
    val_data: Annotated[Path, typer.Option("--val-data", help="Validation folder, same layout.")],
    out: OutOpt = Path("runs/eval_depth"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    layers: Annotated[int, typer.Option("--layers", help="1 = lin.1 (last block), 4 = lin.4 (four blocks).")] = 1,
    size: Annotated[int, typer.Option("--size", min=1, help="Square side the images are resized to.")] = 448,
    n_bins: Annotated[int, typer.Option("--bins", min=2, help="Depth bins (paper: 256).")] = 256,
    min_depth: Annotated[float, typer.Option("--min-depth", help="Lowest bin, metres.")] = 1e-3,
    max_depth: Annotated[float, typer.Option("--max-depth", help="Highest bin, metres (NYU 10, KITTI 80).")] = 10.0,
    norm_strategy: Annotated[str, typer.Option("--bin-norm", help="linear (official) or softmax.")] = "linear",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the cached train features.")] = 20,
    lr: Annotated[float, typer.Option("--lr", help="AdamW peak learning rate.")] = 1e-3,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Monocular depth linear probe (lin.1/lin.4, 256 bins): RMSE, AbsRel, delta1 on the val set.

    Layout: DIR/images/<stem>.jpg|png and DIR/depth/<stem>.png (uint16, mm) or <stem>.npy (metres);
    depth 0 = invalid.
    Writes metrics.json, head.pt and predictions.png (a few val images) into --out.
    """
    backbone, fingerprint = _backbone(model, weights, random_init, device, fingerprint=cache)
    result = run_depth_eval(
        backbone, train_data, val_data, out, layers=layers, size=size, n_bins=n_bins, min_depth=min_depth,
        max_depth=max_depth, norm_strategy=norm_strategy, epochs=epochs, lr=lr, batch_size=batch_size,
        device=resolve_device(device), fingerprint=fingerprint,
    )  # fmt: skip
    print(f"RMSE {result['rmse']:.4f}  AbsRel {result['abs_rel']:.4f}  delta1 {result['delta1']:.4f}")
    print(f"results in {out}")


def video_command(
    train_data: Annotated[Path, typer.Option("--train-data", help="root/<class>/<clip>/ frames or <clip>.mp4.")],
    val_data: Annotated[Path, typer.Option("--val-data", help="Validation clips, same layout and classes.")],
    out: OutOpt = Path("runs/eval_video"),
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    frames: Annotated[int, typer.Option("--frames", "-t", min=1, help="Frames sampled per clip (uniform).")] = 8,
    image_size: Annotated[int, typer.Option("--image-size", min=1, help="Centre-crop side in px.")] = 224,
    ks: Annotated[list[int], typer.Option("--k", help="k-NN neighbours (repeat the option).")] = [10, 20],  # noqa: B006
    n_c: Annotated[int, typer.Option("--n-c", min=1, help="Logistic-regression C values in the sweep.")] = 45,
    batch_size: BatchOpt = 64,
    device: DeviceOpt = "auto",
    cache: CacheOpt = True,
) -> None:
    """Video classification: frame CLS features averaged per clip, then k-NN and logistic regression.

    Layout: DIR/<class>/<clip>/*.jpg (frame folders) or DIR/<class>/<clip>.mp4 (needs PyAV).
    Writes metrics.json into --out.
    """
    backbone, fingerprint = _backbone(model, weights, random_init, device, fingerprint=cache)
    result = run_video_eval(backbone, train_data, val_data, out, frames=frames, image_size=image_size, ks=ks,
                            n_c=n_c, batch_size=batch_size, device=resolve_device(device),
                            fingerprint=fingerprint)  # fmt: skip
    best_knn = max(v["top1"] for v in result["knn"].values())
    print(f"k-NN top1 {best_knn:.2f}  logreg top1 {result['logreg']['top1']:.2f}")
    print(f"results in {out}")


app = typer.Typer(help="Frozen-backbone evaluations (JSON metrics in an output folder).", no_args_is_help=True)
app.command("knn")(knn_command)
app.command("linear")(linear_command)
app.command("logreg")(logreg_command)
app.command("retrieval")(retrieval_command)
app.command("seg")(seg_command)
app.command("depth")(depth_command)
app.command("video")(video_command)

"""`dinoforge viz pca | match | attn`: figures of a backbone's features (default images: sample photos)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinoforge.cli_common import DeviceOpt, ModelOpt, OutOpt, RandomInitOpt, WeightsOpt
from dinoforge.models.weights import load_model

app = typer.Typer(help="Figures: patch PCA, patch matching, attention maps.", no_args_is_help=True)

ImagesOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--images",
        "-i",
        help="Image file or folder (repeat the option for more). Default: scikit-image's sample photos.",
    ),
]
SizeOpt = Annotated[
    int | None,
    typer.Option(
        "--size",
        min=1,
        help="Shorter image side in px, cropped to a multiple of the patch size. "
        "Default: the image's own shorter side, at most 224.",
    ),
]


def _load_images(paths: list[Path] | None):
    """(names, RGB PIL images) from files/folders, or the bundled sample photos when none are given."""
    from dinoforge.data.datasets import list_images, load_image, load_sample_photos
    from dinoforge.utils import DinoforgeError, require_file

    if not paths:
        photos = load_sample_photos()
        return list(photos), list(photos.values())
    files: list[Path] = []
    for p in paths:
        require_file(p, "image")
        files.extend(list_images(p) if p.is_dir() else [p])
    if not files:
        raise DinoforgeError(f"no images found in {', '.join(map(str, paths))}")
    return [f.stem for f in files], [load_image(f) for f in files]


@app.command("pca")
def pca_command(
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    images: ImagesOpt = None,
    size: SizeOpt = None,
    foreground: Annotated[
        bool, typer.Option("--foreground/--no-foreground", help="Split foreground by thresholding PC1.")
    ] = True,
    threshold: Annotated[float, typer.Option("--threshold", help="PC1 threshold in standard deviations.")] = 0.0,
    device: DeviceOpt = "auto",
) -> None:
    """PCA of patch features → RGB over a set of images, with the foreground/background split of the paper.

    Writes pca.png (rows: input, foreground mask, PCA colours) and pca.json."""
    from dinoforge.utils import write_json
    from dinoforge.viz.pca import compute_pca, draw_pca

    names, imgs = _load_images(images)
    net = load_model(model, weights, device, random_init)
    result = compute_pca(net, imgs, size, foreground, threshold)
    png = draw_pca(result, out / "pca.png", names)
    fg = [float(m.mean()) for m in result.masks] if result.masks is not None else None
    write_json(
        out / "pca.json",
        {
            "images": names,
            "size": size,
            "grids": [list(f.grid) for f in result.feats],
            "explained_variance_ratio": [float(v) for v in result.explained_variance_ratio],
            "foreground_fraction": fg,
        },
    )
    typer.echo(f"wrote {png} -> {out}")


@app.command("match")
def match_command(
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    images: ImagesOpt = None,
    size: SizeOpt = None,
    foreground: Annotated[
        bool, typer.Option("--foreground/--all-patches", help="Match only foreground patches (PC1 split).")
    ] = False,
    max_lines: Annotated[int, typer.Option("--max-lines", min=1, help="Draw at most this many matches.")] = 80,
    device: DeviceOpt = "auto",
) -> None:
    """Patch matching between two images: mutual nearest neighbours of patch features, lines drawn.

    Takes exactly two images (default: the left and right views of the stereo motorcycle photo).
    Writes match.png and match.json."""
    from dinoforge.data.datasets import load_sample_photos
    from dinoforge.utils import DinoforgeError, write_json
    from dinoforge.viz.matching import compute_matches, draw_matches

    if images:
        names, imgs = _load_images(images)
    else:
        pair = load_sample_photos(["motorcycle_left", "motorcycle_right"])
        names, imgs = list(pair), list(pair.values())
    if len(imgs) != 2:
        raise DinoforgeError(f"viz match takes exactly two images, got {len(imgs)}")
    net = load_model(model, weights, device, random_init)
    m = compute_matches(net, imgs[0], imgs[1], size, foreground)
    png = draw_matches(m, out / "match.png", max_lines, (names[0], names[1]))
    write_json(
        out / "match.json",
        {
            "images": names,
            "size": size,
            "num_matches": len(m.similarity),
            "mean_similarity": float(m.similarity.mean()) if len(m.similarity) else None,
            "matches": [
                {"a": [round(float(v), 1) for v in a], "b": [round(float(v), 1) for v in b], "sim": float(s)}
                for a, b, s in zip(m.xy_a, m.xy_b, m.similarity, strict=True)
            ],
        },
    )
    typer.echo(f"{len(m.similarity)} matches; wrote {png} -> {out}")


@app.command("attn")
def attn_command(
    out: OutOpt,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    images: ImagesOpt = None,
    size: SizeOpt = None,
    block: Annotated[int, typer.Option("--block", help="Block index (negative counts from the end).")] = -1,
    device: DeviceOpt = "auto",
) -> None:
    """Attention maps of the last (or --block) block: CLS → patches, one panel per head (registers skipped).

    Writes attention.png and attention.json (per-head entropy of each map)."""
    from dinoforge.utils import write_json
    from dinoforge.viz.attention import attention_entropy, compute_attention, draw_attention

    names, imgs = _load_images(images)
    net = load_model(model, weights, device, random_init)
    results = compute_attention(net, imgs, size, block)
    png = draw_attention(results, out / "attention.png", names)
    entropy = {n: attention_entropy(maps).tolist() for n, (_, maps) in zip(names, results, strict=True)}
    write_json(out / "attention.json", {"images": names, "size": size, "block": block, "entropy": entropy})
    typer.echo(f"wrote {png} -> {out}")

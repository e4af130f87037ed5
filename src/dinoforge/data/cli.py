"""`dinoforge data ...`: data preparation (pack images into tar shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinoforge.cli_common import OutOpt

app = typer.Typer(help="Data preparation: pack images into tar shards.", no_args_is_help=True)

MaxImagesOpt = Annotated[int, typer.Option("--max-images", min=1, help="Images per shard at most.")]
MaxMbOpt = Annotated[
    float,
    typer.Option("--max-mb", min=0.001, help="MB of file data per shard: it closes at the first image past it."),
]


def pack_to(data: str, out: Path, max_images: int, max_mb: float) -> dict:
    """Pack a data spec into shards in `out` and print where they are (the command's body; `curate run` reuses it)."""
    from dinoforge.data.datasets import build_dataset
    from dinoforge.data.pack import pack_shards

    record = pack_shards(build_dataset(data), out, max_images=max_images, max_mb=max_mb)
    typer.echo(f"packed {record['images']} images into {record['shards']} shards -> {record['spec']}")
    if record["missing"]:
        typer.echo(f"skipped {record['missing']} unreadable files (first: {record['first_missing']})", err=True)
    return record


@app.command("pack")
def pack_cmd(
    data: Annotated[
        str,
        typer.Option(
            "--data", "-d", help="Image folder, .txt/.csv/.jsonl list (a curated manifest), bundled[:split] or shards."
        ),
    ],
    out: OutOpt,
    max_images: MaxImagesOpt = 10000,
    max_mb: MaxMbOpt = 1000.0,
) -> None:
    """Write images into tar shards (webdataset layout: the original file bytes, KEY.cls label, KEY.json with the
    original name and class) as OUT/000000.tar, ...; writes OUT/pack.json with the shard pattern to give as --data
    (`OUT/{000000..000009}.tar`) to train, embed, eval and curate."""
    pack_to(data, out, max_images, max_mb)

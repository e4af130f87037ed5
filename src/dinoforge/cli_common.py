"""Options shared by every command that takes a backbone or writes an output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Backbone name (dinov2_vits14, dinov2_vitb14_reg, ...: released weights from the torch.hub or Hugging "
        "Face cache, never downloaded) or a weights file.",
    ),
]
RandomInitOpt = Annotated[
    bool,
    typer.Option(
        "--random-init", help="A hub name with a seeded random init instead of released weights (baselines only)."
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--weights", "-w", help="Local weights: official .pth, training checkpoint, .safetensors or HF folder."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]

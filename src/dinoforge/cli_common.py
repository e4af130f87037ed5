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


def load_model_from_opts(model: str | None, weights: Path | None, device: str = "auto", random_init: bool = False):
    """Resolve --model/--weights/--random-init into an eval-mode backbone on the chosen device."""
    from dinoforge.models.weights import load_backbone
    from dinoforge.utils import DinoforgeError, resolve_device

    if model is None and weights is None:
        raise DinoforgeError("give --model NAME and/or --weights PATH")
    device = str(resolve_device(device))
    return load_backbone(model or str(weights), weights=weights, device=device, random_init=random_init).eval()

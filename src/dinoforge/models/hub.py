"""Where the released DINOv2 weights of a hub name already are on this machine. Nothing is downloaded.

`find_hub_weights(name)` looks, in this order, in
1. torch.hub's checkpoint cache, `torch.hub.get_dir()/checkpoints/<file>` (`$TORCH_HOME/hub`, else
   `$XDG_CACHE_HOME/torch/hub`, else `~/.cache/torch/hub`), for the official file name (`dinov2_vits14_pretrain.pth`,
   `dinov2_vits14_reg4_pretrain.pth` for `dinov2_vits14_reg`, ...): where `torch.hub.load` leaves it;
2. the Hugging Face cache, `$HF_HUB_CACHE` and `$HF_HOME/hub` (default `~/.cache/huggingface/hub`), for the
   snapshot folders of `facebook/dinov2-small|base|large|giant` (`facebook/dinov2-with-registers-*` for `_reg`):
   the newest snapshot (by modification time) that holds config.json and weights, where `from_pretrained` leaves it.
Neither: one DinoforgeError naming the files and the places searched, and the explicit random-init alternative.
"""

from __future__ import annotations

import os
from pathlib import Path

from dinoforge.utils import DinoforgeError

_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
# hub name -> torch.hub checkpoint file name and Hugging Face repository of the released weights
TORCH_HUB_FILES: dict[str, str] = {}
HF_REPOS: dict[str, str] = {}
for _s, _size in _SIZES.items():
    TORCH_HUB_FILES[f"dinov2_vit{_s}14"] = f"dinov2_vit{_s}14_pretrain.pth"
    TORCH_HUB_FILES[f"dinov2_vit{_s}14_reg"] = f"dinov2_vit{_s}14_reg4_pretrain.pth"
    HF_REPOS[f"dinov2_vit{_s}14"] = f"facebook/dinov2-{_size}"
    HF_REPOS[f"dinov2_vit{_s}14_reg"] = f"facebook/dinov2-with-registers-{_size}"


def torch_hub_checkpoint_dir() -> Path:
    """torch.hub's checkpoint folder (honours $TORCH_HOME and $XDG_CACHE_HOME, like torch.hub.load)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache_dirs() -> list[Path]:
    """The Hugging Face hub caches to search: $HF_HUB_CACHE (or the older $HUGGINGFACE_HUB_CACHE) when set, and
    $HF_HOME/hub (default $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub)."""
    dirs = [Path(os.environ[k]) for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE") if os.environ.get(k)]
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    dirs.append(Path(home).expanduser() / "hub")
    return list(dict.fromkeys(d.expanduser() for d in dirs))


def _holds_weights(folder: Path) -> bool:
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return (folder / "config.json").is_file() and has_weights


def _newest_snapshot(cache: Path, repo: str) -> Path | None:
    snapshots = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
    found = [p for p in snapshots.glob("*") if p.is_dir() and _holds_weights(p)] if snapshots.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def find_hub_weights(name: str) -> Path:
    """The local file (torch.hub) or folder (Hugging Face snapshot) holding the released weights of a hub name."""
    if name not in TORCH_HUB_FILES:
        raise DinoforgeError(f"unknown hub name {name!r}: not one of {', '.join(TORCH_HUB_FILES)}")
    checkpoint = torch_hub_checkpoint_dir() / TORCH_HUB_FILES[name]
    if checkpoint.is_file():
        return checkpoint
    repo = HF_REPOS[name]
    caches = hf_hub_cache_dirs()
    for cache in caches:
        snapshot = _newest_snapshot(cache, repo)
        if snapshot is not None:
            return snapshot
    hf_places = " or ".join(str(c / ("models--" + repo.replace("/", "--")) / "snapshots") for c in caches)
    raise DinoforgeError(
        f"no released weights for {name} on this machine (nothing is downloaded): looked for {checkpoint} "
        f"(torch.hub cache) and for a {repo} snapshot in {hf_places} (Hugging Face cache); "
        f"fetch them once with torch.hub.load('facebookresearch/dinov2', '{name}') or "
        f"huggingface-cli download {repo}, give --weights PATH (weights=...), "
        f"or --random-init (random_init=True) for a random-init baseline"
    )


def weights_source(model: str | None, weights: str | Path | None = None, random_init: bool = False) -> str | None:
    """What `load_backbone(model, weights, random_init=...)` reads, for records and cache keys: the weights given,
    else a hub name's cached file (find_hub_weights), else the model path itself; None for a random init."""
    if random_init:
        return None
    if weights is not None:
        return str(weights)
    if model in TORCH_HUB_FILES:
        return str(find_hub_weights(model))
    return model

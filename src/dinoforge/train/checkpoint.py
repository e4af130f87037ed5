"""Training checkpoints: written atomically, the last few kept, found again by --resume."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from dinoforge.utils import DinoforgeError, atomic_torch_save

CKPT_RE = re.compile(r"model_(\d+)\.pth$")


def rng_state() -> dict:
    """All RNG states, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoints in a folder, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("model_*.pth") if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(ckpt_dir: Path, iteration: int, payload: dict, keep: int = 3) -> Path:
    """Write model_{iteration}.pth atomically (temp file + rename), then drop all but the newest `keep`."""
    path = atomic_torch_save({**payload, "iteration": iteration}, Path(ckpt_dir) / f"model_{iteration:07d}.pth")
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint written by save_checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise DinoforgeError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def check_crop_size(ckpt: dict, global_crops_size: int, path: Path) -> None:
    """Refuse to resume a checkpoint trained at another global crop size (its position embedding has another grid):
    one line that says how to resume, or how to continue at the new size as a new run."""
    trained = ckpt.get("config", {}).get("crops", {}).get("global_crops_size")
    if trained is not None and trained != global_crops_size:
        raise DinoforgeError(
            f"cannot resume {path}: it was trained with crops.global_crops_size={trained}, the config asks for "
            f"{global_crops_size}; resume with crops.global_crops_size={trained}, or start a new run (another -o) "
            f"from it with student.pretrained_weights={path} (position embedding resized, heads kept)"
        )

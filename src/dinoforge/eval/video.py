"""Video classification from frozen image features: T uniformly sampled frames, CLS features averaged per
clip, then k-NN and logistic regression on clip labels (the paper's frame-averaging video protocol, §7).

Data layout (`--train-data` / `--val-data`): ``root/<class>/<clip>/*.jpg|png`` (a folder of frames per
clip, frames in name order) or ``root/<class>/<clip>.mp4|avi|mov|mkv|webm`` (video files, decoded with
PyAV when it is installed: ``pip install av``; without it, extract frames into clip folders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dinoforge.data.datasets import is_image_file, load_image
from dinoforge.eval.features import (
    ARRAYS,
    cached,
    eval_transform_for,
    extract_features,
    feature_key,
)
from dinoforge.eval.knn import knn_evaluate
from dinoforge.eval.logreg import default_c_grid, logreg_evaluate
from dinoforge.utils import DinoforgeError, write_json

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class Clip:
    """One clip: a folder of frames or a video file, and its class index."""

    path: Path
    label: int


def list_clips(root: str | Path, classes: list[str] | None = None) -> tuple[list[Clip], list[str]]:
    """Clips under root/<class>/ (frame folders or video files); `classes` fixes the label order (val set)."""
    root = Path(root)
    if not root.is_dir():
        raise DinoforgeError(f"video folder not found: {root}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DinoforgeError(f"classes in {root} not in the train set: {', '.join(unknown[:5])}")
    clips = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.name.startswith("."):
                continue
            if (p.is_dir() and any(is_image_file(f) for f in p.iterdir())) or p.suffix.lower() in VIDEO_EXTS:
                clips.append(Clip(p, label))
    if not clips:
        raise DinoforgeError(f"no clips in {root}: expected {root}/<class>/<clip>/*.jpg or <class>/<clip>.mp4")
    return clips, classes


def sample_indices(n_frames: int, t: int) -> list[int]:
    """Centres of `t` equal segments of a clip of `n_frames` frames (repeats when the clip is shorter)."""
    if n_frames < 1:
        raise DinoforgeError("a clip has no frames")
    return [min(n_frames - 1, int((i + 0.5) * n_frames / t)) for i in range(t)]


def _decode_video(path: Path, t: int) -> list[Any]:
    try:
        import av
    except ImportError:
        raise DinoforgeError(
            f"cannot decode {path.name}: video files need PyAV (pip install av); "
            "or extract the frames into <class>/<clip>/*.jpg folders, which work without it"
        ) from None
    try:
        with av.open(str(path)) as container:  # header frame count, else one counting pass
            n = container.streams.video[0].frames or sum(1 for _ in container.decode(video=0))
        wanted = sample_indices(n, t)
        kept: dict[int, Any] = {}
        with av.open(str(path)) as container:  # keep only the sampled frames in memory
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    kept[i] = frame.to_image()
                if i >= wanted[-1]:
                    break
    except (av.error.FFmpegError, IndexError) as e:
        raise DinoforgeError(f"cannot decode video {path}: {e}") from None
    if not kept:
        raise DinoforgeError(f"no frames decoded from {path}")
    last = max(kept)  # a header count that overstates the frames: fall back to the last decoded one
    return [kept.get(i, kept[last]) for i in wanted]


def clip_frames(clip: Clip, t: int) -> list[Any]:
    """The `t` uniformly sampled frames of a clip as RGB PIL images."""
    if clip.path.is_dir():
        files = sorted(f for f in clip.path.iterdir() if is_image_file(f))
        return [load_image(files[i]) for i in sample_indices(len(files), t)]
    return _decode_video(clip.path, t)


class FrameDataset(Dataset):
    """Every sampled frame of every clip as (tensor, clip index, frame index): frames of clip c are rows
    c*t .. c*t+t-1."""

    def __init__(self, clips: list[Clip], t: int, transform) -> None:
        self.clips, self.t, self.transform = clips, t, transform
        self._cache: tuple[int, list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.clips) * self.t

    def __getitem__(self, i: int):
        c = i // self.t
        if self._cache is None or self._cache[0] != c:  # decode each clip once for its t frames
            self._cache = (c, clip_frames(self.clips[c], self.t))
        return self.transform(self._cache[1][i % self.t]), c, i


def average_per_clip(frame_feats: torch.Tensor, clip_ids: torch.Tensor, n_clips: int) -> torch.Tensor:
    """Mean feature of each clip's frames (rows of `frame_feats` grouped by `clip_ids`)."""
    sums = torch.zeros(n_clips, frame_feats.shape[1], dtype=torch.float64)
    sums.index_add_(0, clip_ids.long(), frame_feats.double())
    counts = torch.bincount(clip_ids.long(), minlength=n_clips).clamp_min(1)
    return (sums / counts[:, None]).float()


def clip_features(
    backbone: torch.nn.Module,
    clips: list[Clip],
    t: int = 8,
    image_size: int = 224,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    fingerprint: str | None = None,
) -> torch.Tensor:
    """(n_clips, D): final normed CLS of `t` sampled frames, averaged per clip; cached when fingerprinted."""
    transform, _ = eval_transform_for(str(clips[0].path), image_size, int(getattr(backbone, "patch_size", 14)))
    dataset = FrameDataset(clips, t, transform)

    def compute() -> dict[str, np.ndarray]:
        feats = extract_features(
            backbone, dataset, batch_size, device, desc="frame features", layers=1, patch_mean=True
        )
        return {name: feats[name] for name in ARRAYS}

    if fingerprint is None:
        feats = compute()
    else:
        data_id = "video|" + "|".join(f"{c.path.resolve()}:{c.label}" for c in clips) + f"|t={t}"
        feats = cached(feature_key(fingerprint, data_id, f"{transform!r}"), compute)
    return average_per_clip(torch.from_numpy(feats["cls"][:, -1]), torch.from_numpy(feats["labels"]), len(clips))


def video_evaluate(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    ks: list[int] | tuple[int, ...] = (10, 20),
    n_c: int = 45,
) -> dict:
    """k-NN (cosine, T = 0.07) and logistic regression (C chosen on held-out 10%) top-1 on clip features."""
    knn = knn_evaluate(train_x, train_y, test_x, test_y, ks)["full"]
    logreg = logreg_evaluate(train_x, train_y, test_x, test_y, c_grid=default_c_grid(n_c))
    return {"knn": knn, "logreg": {k: v for k, v in logreg.items() if k != "sweep"}}


def run_video_eval(
    backbone: torch.nn.Module,
    train_data: Path,
    val_data: Path,
    out: Path,
    *,
    frames: int = 8,
    image_size: int = 224,
    ks: list[int] | tuple[int, ...] = (10, 20),
    n_c: int = 45,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    fingerprint: str | None = None,
) -> dict:
    """Clip features of both sets, k-NN + logistic regression on clip labels; writes metrics.json."""
    train_clips, classes = list_clips(train_data)
    val_clips, _ = list_clips(val_data, classes)
    backbone = backbone.to(device).eval()
    tr = clip_features(backbone, train_clips, frames, image_size, batch_size, device, fingerprint)
    te = clip_features(backbone, val_clips, frames, image_size, batch_size, device, fingerprint)
    labels = [torch.tensor([c.label for c in cs]) for cs in (train_clips, val_clips)]
    metrics = video_evaluate(tr, labels[0], te, labels[1], ks, n_c)
    result = {"task": "video", "frames": frames, "image_size": image_size, "classes": classes,
              "num_train": len(train_clips), "num_val": len(val_clips), **metrics}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    return result

"""Embedding shards on disk: float16 `.npy` files read memory-mapped, with their image lists, and batch
access.

Everything in curate/ takes "data" as one array or a list of arrays (the shards), so a pool larger than RAM is
read in batches and never materialised whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinoforge.utils import DinoforgeError

Data = np.ndarray | Sequence[np.ndarray]


def absolute_name(name: str) -> str:
    """An image name as an absolute path (relative paths are taken against the current folder), so shard
    lists and manifests do not depend on where a later command runs. Symlinks are kept (their names are what
    the user gave); names of built-in datasets (`bundled:train/17`) are not paths and stay as they are."""
    if os.path.isabs(name) or (name.startswith(("bundled:", "bundled-full:")) and not os.path.exists(name)):
        return name
    return os.path.abspath(name)


def describe_identity(identity: dict | None) -> str:
    """One line naming the embedder recorded in a shard (see `curate.embed.embedder_identity`)."""
    if not identity:
        return "an unrecorded model (shards written before dinoforge recorded the embedder)"
    return ", ".join(f"{k}={v}" for k, v in identity.items())


def read_shard_meta(meta_path: Path) -> dict:
    """A finished shard's `.json` (paths, skipped, embedder); a damaged one is a one-line DinoforgeError."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        meta = None
    if not (isinstance(meta, dict) and isinstance(meta.get("paths"), list) and isinstance(meta.get("skipped"), list)):
        raise DinoforgeError(
            f"{meta_path} is not a readable embedding shard: delete it (and its .npy) to embed that shard again"
        )
    return meta


def _parts(data: Data) -> list[np.ndarray]:
    return [data] if isinstance(data, np.ndarray) else list(data)


def num_rows(data: Data) -> int:
    """Total number of vectors in an array or a list of shards."""
    return sum(int(p.shape[0]) for p in _parts(data))


def _name(part: np.ndarray, i: int) -> str:
    """A shard's file (memory-mapped shards know it), else its place in the list."""
    return str(getattr(part, "filename", None) or f"embedding shard {i}")


def dim(data: Data) -> int:
    """Vector dimension of an array or a list of shards; shards of different widths are a one-line error."""
    parts = [(i, p) for i, p in enumerate(_parts(data)) if p.ndim == 2]
    if not parts:
        raise DinoforgeError("no embeddings")
    d = int(parts[0][1].shape[1])
    for i, p in parts:
        if p.shape[1] != d:
            raise DinoforgeError(
                f"{_name(p, i)} holds {p.shape[1]}-wide vectors, {_name(parts[0][1], parts[0][0])} {d}-wide: "
                "embeddings of one pool come from one model"
            )
    return d


def _finite(x: np.ndarray, part: np.ndarray, i: int, rows: np.ndarray | int) -> np.ndarray:
    """x (rows of shard `part`) when every value is finite; else a one-line error naming the shard and row."""
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        first = int(np.asarray(rows).reshape(-1)[np.argmax(bad)]) if np.ndim(rows) else rows + int(np.argmax(bad))
        raise DinoforgeError(
            f"{_name(part, i)}: row {first} holds NaN or infinite values ({int(bad.sum())} such rows in this "
            "batch): embed its images again"
        )
    return x


def iter_batches(data: Data, batch_size: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (global start row, float32 contiguous batch) over an array or shards, reading one batch at a
    time. A NaN or infinite value is a one-line error naming the shard."""
    start = 0
    for i, part in enumerate(_parts(data)):
        for s in range(0, part.shape[0], batch_size):
            yield start + s, _finite(np.ascontiguousarray(part[s : s + batch_size], dtype=np.float32), part, i, s)
        start += part.shape[0]


def to_array(data: Data) -> np.ndarray:
    """Materialise as one float32 array (small pools, faiss training)."""
    parts = _parts(data)
    if not parts:
        return np.zeros((0, 0), np.float32)
    return np.ascontiguousarray(np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]))


def row_range(data: Data, start: int, stop: int) -> list[np.ndarray]:
    """Rows [start, stop) of an array or shards as a list of views (nothing is read)."""
    out, offset = [], 0
    for part in _parts(data):
        a, b = max(start - offset, 0), min(stop - offset, part.shape[0])
        if a < b:
            out.append(part[a:b])
        offset += part.shape[0]
    return out


def take_rows(data: Data, rows: np.ndarray) -> np.ndarray:
    """Gather rows by global index from an array or shards, as float32."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), dim(data)), np.float32)
    start = 0
    for i, part in enumerate(_parts(data)):
        sel = np.nonzero((rows >= start) & (rows < start + part.shape[0]))[0]
        if len(sel):
            out[sel] = _finite(np.asarray(part[rows[sel] - start], np.float32), part, i, rows[sel] - start)
        start += part.shape[0]
    return out


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows (float32) so inner product is cosine similarity; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _load_shard(path: Path) -> np.ndarray:
    """A shard's vectors, memory-mapped; a missing or unreadable `.npy` is a one-line error naming it."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DinoforgeError(f"cannot read embedding shard {path}: {e}; embed that shard again") from None
    if arr.ndim != 2:
        raise DinoforgeError(f"{path} holds an array of shape {arr.shape}, not one vector per row")
    return arr


@dataclass
class EmbeddingStore:
    """A folder of embedding shards `shard_XXXXX.npy` (float16, memory-mapped) + `shard_XXXXX.json`
    (paths, stats), and the identity of the model that embedded them (None for shards that did not record it)."""

    root: Path
    shards: list[np.ndarray]
    paths: list[str]
    skipped: list[str]
    embedder: dict | None = None

    @classmethod
    def open(cls, root: str | Path) -> EmbeddingStore:
        """Open a finished embedding folder (written by `curate.embed.embed_images`)."""
        root = Path(root)
        metas = sorted(root.glob("shard_*.json"))
        orphans = sorted({p.stem for p in root.glob("shard_*.npy")} - {p.stem for p in metas})
        if orphans:
            raise DinoforgeError(
                f"{root / orphans[0]}.npy has no .json file list ({len(orphans)} such shards): run `dinoforge curate "
                "embed` again to finish them"
            )
        if not metas:
            raise DinoforgeError(f"no embedding shards in {root} (run `dinoforge curate embed` first)")
        shards, paths, skipped = [], [], []
        first: tuple[Path, dict | None] | None = None
        for meta_path in metas:
            meta = read_shard_meta(meta_path)
            if first is None:
                first = (meta_path, meta.get("embedder"))
            elif meta.get("embedder") != first[1]:
                raise DinoforgeError(
                    f"{root} mixes embeddings of different models: {first[0].name} from "
                    f"{describe_identity(first[1])}, {meta_path.name} from {describe_identity(meta.get('embedder'))}"
                )
            arr = _load_shard(meta_path.with_suffix(".npy"))
            if arr.shape[0] != len(meta["paths"]):
                raise DinoforgeError(f"{meta_path}: {arr.shape[0]} vectors but {len(meta['paths'])} paths")
            if shards and arr.shape[0] and arr.shape[1] != shards[0].shape[1]:
                raise DinoforgeError(
                    f"{meta_path.with_suffix('.npy')} holds {arr.shape[1]}-wide vectors, {shards[0].filename} "
                    f"{shards[0].shape[1]}-wide: embeddings of one pool come from one model"
                )
            if arr.shape[0]:
                shards.append(arr)
            paths += meta["paths"]
            skipped += meta["skipped"]
        return cls(root, shards, paths, skipped, first[1])

    def __len__(self) -> int:
        return len(self.paths)

    def array(self) -> np.ndarray:
        """All vectors as one float32 array."""
        return to_array(self.shards)

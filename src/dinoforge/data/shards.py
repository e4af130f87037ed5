"""Tar shards in the webdataset layout (`KEY.<image ext>`, `KEY.cls`, `KEY.json` per sample), read map-style
through a saved index: one `<shard>.idx.npz` per shard (offsets, sizes, labels as numpy columns, written at pack
time), so start-up reads a few numbers per sample and no tar. Shards from another tool are indexed once (in
parallel, by one process of the machine) and the index saved beside them, or in the user's cache when read-only.

An image is one positioned read from a bounded set of open shards (an LRU of file handles). A shard that cannot be
indexed (truncated, not a tar) is skipped and counted, with its name printed once, like a corrupt member.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from braceexpand import braceexpand
from torch.utils.data import Dataset

from dinoforge import distributed
from dinoforge.data.datasets import IMAGE_EXTENSIONS, Transform, check_classes, decode_image
from dinoforge.utils import DinoforgeError, atomic_write, eprint

INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
_COLUMNS = {
    "offset": np.int64,
    "size": np.uint32,
    "json_offset": np.int64,
    "json_size": np.uint32,
    "label": np.int32,
    "klass": np.int32,
    "ext": np.uint8,
}
"""The saved index's columns and types: 33 bytes a sample on disk; start-up reads only label and klass."""
OPEN_SHARDS = 64
"""Shard files a process keeps open at most (least recently read closed first): far below the usual 1,024 limit."""


def shard_files(spec: str | Path) -> list[Path] | None:
    """The tar files a shard spec names (`shards/{000000..000099}.tar`, `a.tar`, `{a,b}.tar`), in order; None when
    `spec` is not a shard spec (it does not end in .tar). A missing shard is an error naming it."""
    s = str(spec)
    if not s.endswith(".tar"):
        return None
    files = [Path(p) for p in braceexpand(s)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DinoforgeError(f"shard not found: {missing[0]} ({len(missing)} of the {len(files)} shards of {s})")
    return files


def _sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member as webdataset splits it: the extension starts at the base name's first dot."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def index_shard(path: Path) -> dict[str, np.ndarray]:
    """One pass over a tar's headers: per sample with an image member, its offset and size, its json member's, its
    label (`.cls`, else the json's "label"; -1 when none) and class name; as numpy columns plus the tables they
    index (`exts`, `classes`) and the keys of samples without an image. DinoforgeError when the tar is unreadable."""
    samples: dict[str, dict[str, Any]] = {}
    tar_bytes = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > tar_bytes:
                    raise tarfile.ReadError(f"truncated: {member.name} ends past the end of the file")
                key, ext = _sample_key(member.name)
                sample = samples.setdefault(key, {})
                if ext in ("json", "cls"):
                    try:
                        value = json.loads(tar.extractfile(member).read())
                    except ValueError:
                        continue  # an unreadable label: the image stays, unlabelled
                    if ext == "cls" and isinstance(value, int):
                        sample["cls"] = value
                    elif ext == "json" and isinstance(value, dict):
                        sample |= {"json": (member.offset_data, member.size), "meta": value}
                elif f".{ext.rpartition('.')[2]}" in IMAGE_EXTENSIONS:
                    sample |= {"offset": member.offset_data, "size": member.size, "ext": ext}
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(512) != bytes(512):  # tarfile stops quietly at a cut header
                raise tarfile.ReadError(f"truncated or damaged after byte {tar.offset} (no end-of-archive block)")
    except (OSError, tarfile.TarError) as e:
        raise DinoforgeError(f"cannot read shard {path}: {e}") from None
    kept = [s for s in samples.values() if "offset" in s]
    exts = sorted({s["ext"] for s in kept})
    names = [s.get("meta", {}).get("class") for s in kept]
    classes = sorted({str(c) for c in names if c is not None})
    label = [s["cls"] if "cls" in s else s.get("meta", {}).get("label") for s in kept]
    columns = {
        "offset": [s["offset"] for s in kept],
        "size": [s["size"] for s in kept],
        "json_offset": [s.get("json", (-1, 0))[0] for s in kept],
        "json_size": [s.get("json", (-1, 0))[1] for s in kept],
        "label": [x if isinstance(x, int) and not isinstance(x, bool) else -1 for x in label],
        "klass": [-1 if c is None else classes.index(str(c)) for c in names],
        "ext": [exts.index(s["ext"]) for s in kept],
    }
    out = {k: np.asarray(v, _COLUMNS[k]).reshape(-1) for k, v in columns.items()}
    ignored = [k for k, s in samples.items() if "offset" not in s]
    info = {"version": INDEX_VERSION, "tar_bytes": tar_bytes, "exts": exts, "classes": classes}
    return out | {"info": np.array(json.dumps(info | {"ignored": ignored}))}


def _cached_index_path(path: Path) -> Path:
    """Where the index of a shard in a read-only folder is cached: the user's cache, by the shard's absolute path."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoforge" / "shard-index"
    return base / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + INDEX_SUFFIX)


def index_path(path: Path) -> Path:
    """The index file of a shard: beside it (`000000.tar.idx.npz`), or the cached one when only that exists."""
    beside = path.with_name(path.name + INDEX_SUFFIX)
    cached = _cached_index_path(path)
    return cached if not beside.exists() and cached.exists() else beside


def write_index(path: Path) -> Path:
    """Index one shard and save it (atomically) beside it, or in the user's cache when its folder is read-only."""
    arrays = index_shard(path)
    for out in (path.with_name(path.name + INDEX_SUFFIX), _cached_index_path(path)):
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out, lambda f: np.savez(f, **arrays))
            return out
        except OSError:
            continue
    raise DinoforgeError(f"cannot save the index of {path}, beside it or in {out.parent}")


def _index_or_error(path: Path) -> str | None:
    """Write a shard's index; the error line when the shard is unreadable (for the process pool)."""
    try:
        write_index(path)
    except DinoforgeError as e:
        return str(e)
    return None


def _read_index(path: Path) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """A shard's saved index when it is current (its version and the tar's size match): its header and its label
    and class columns (all that start-up reads); else None."""
    idx = index_path(path)
    if not idx.exists():
        return None
    try:
        with np.load(idx) as z:
            info = json.loads(str(z["info"]))
            if info.get("version") != INDEX_VERSION or info.get("tar_bytes") != path.stat().st_size:
                return None
            return info, z["label"], z["klass"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_indexes(shards: Sequence[Path], workers: int | None = None) -> dict[Path, str]:
    """Index the shards that have no current index, in parallel processes: returns the shards that could not be
    indexed, with their error line. One process of this machine builds them (a file lock in the user's cache, not a
    collective, so a rank may open shards alone); the others wait for it and then read what it saved."""
    if not shards:
        return {}
    lock = _cached_index_path(Path(shards[0])).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        missing = [p for p in shards if _read_index(p) is None]
        workers = max(1, min(len(missing), workers or os.cpu_count() or 1))
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                errors = list(pool.map(_index_or_error, missing, chunksize=max(1, len(missing) // (4 * workers))))
        else:
            errors = [_index_or_error(p) for p in missing]
    return {p: e for p, e in zip(missing, errors, strict=True) if e}


class ShardDataset(Dataset):
    """The images of tar shards, map-style: item i is the i-th sample of the readable shards in order.

    Start-up reads each shard's saved label column (`ensure_indexes` makes missing ones); per sample the dataset holds
    its label (8 bytes) and nothing else. `.labels` and `.classes` are what a folder, file list or bundled set of the
    same images gives: the packed class index when every class has images, else class names indexed in sorted
    order (or by `classes`). A member that does not decode comes back as None, like a corrupt file; an unreadable
    shard is left out, listed in `.skipped_shards` and named once on stderr."""

    def __init__(self, shards: Sequence[Path], transform: Transform = None, classes: Sequence[str] | None = None):
        saved = {Path(p): _read_index(Path(p)) for p in shards}
        failed = ensure_indexes([p for p, index in saved.items() if index is None])
        saved |= {p: _read_index(p) for p, index in saved.items() if index is None and p not in failed}
        self.skipped_shards = [str(p) for p in failed]
        if failed and distributed.rank_world_or_env()[0] == 0:  # named once, not once per rank
            first = next(iter(failed.values()))
            eprint(f"skipped {len(failed)} unreadable shard(s) of {len(shards)} (first: {first})")
        self.shards = [Path(s) for s in shards if Path(s) not in failed]
        if not self.shards:
            raise DinoforgeError(next(iter(failed.values())) if failed else "no shards")
        self.transform = transform
        if any(saved[p] is None for p in self.shards):
            raise DinoforgeError(f"cannot read the saved index of {next(p for p in self.shards if saved[p] is None)}")
        infos, labels, klasses = zip(*(saved[p] for p in self.shards), strict=True)
        self.ignored = [f"{p}:{k}" for p, info in zip(self.shards, infos, strict=True) for k in info["ignored"]]
        self._exts = [info["exts"] for info in infos]
        self.starts = np.cumsum([0] + [len(x) for x in labels])
        self.labels, self.classes = _global_labels(labels, klasses, [i["classes"] for i in infos], classes, self.shards)
        self._open: OrderedDict[int, tuple[int, dict[str, np.ndarray]]] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_open": OrderedDict()}  # loader workers open their own files

    def __del__(self) -> None:
        for fd, _ in getattr(self, "_open", {}).values():
            os.close(fd)

    def _entry(self, index: int) -> tuple[int, dict[str, np.ndarray], int, int]:
        """(file descriptor, index columns, shard, row in shard) of item `index`, its shard opened if needed (the
        least recently read one closed beyond OPEN_SHARDS)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        entry = self._open.pop(shard, None)
        if entry is None:
            if len(self._open) >= OPEN_SHARDS:
                os.close(self._open.popitem(last=False)[1][0])
            with np.load(index_path(self.shards[shard])) as z:
                columns = {k: z[k] for k in _COLUMNS if k not in ("label", "klass")}
            entry = (os.open(self.shards[shard], os.O_RDONLY), columns)
        self._open[shard] = entry
        return entry[0], entry[1], shard, index - int(self.starts[shard])

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of item `index`, as packed (one positioned read)."""
        fd, col, _, row = self._entry(index)
        return os.pread(fd, int(col["size"][row]), int(col["offset"][row]))

    def ext(self, index: int) -> str:
        """The image member's extension (`jpg`, `png`, ...)."""
        _, col, shard, row = self._entry(index)
        return self._exts[shard][int(col["ext"][row])]

    def meta(self, index: int) -> dict[str, Any]:
        """The sample's json member (its original name and provenance), {} when it has none."""
        fd, col, _, row = self._entry(index)
        if col["json_offset"][row] < 0:
            return {}
        try:
            return json.loads(os.pread(fd, int(col["json_size"][row]), int(col["json_offset"][row])))
        except (OSError, ValueError):
            return {}

    def item_name(self, index: int) -> str:
        """The original name the packer recorded, else `shard.tar:ROW`."""
        _, _, shard, row = self._entry(index)
        return str(self.meta(index).get("path") or f"{self.shards[shard]}:{row}")

    def __getitem__(self, index: int):
        try:
            img = decode_image(self.read_bytes(index), self.item_name(index))
        except DinoforgeError:
            return None
        except OSError as e:
            eprint(f"cannot read {self.item_name(index)}: {e}")
            return None
        return (self.transform(img) if self.transform else img), int(self.labels[index]), index


def _global_labels(
    labels: list[np.ndarray],
    klasses: list[np.ndarray],
    tables: list[list[str]],
    classes: Sequence[str] | None,
    shards: Sequence[Path],
) -> tuple[np.ndarray, list[str]]:
    """Every sample's label over all shards, and the class names: class names index the labels (the packed index
    when it covers every class once, else sorted names or `classes`); without names, the integer labels as packed."""
    pairs = set()
    for lab, kl, table in zip(labels, klasses, tables, strict=True):
        has = kl >= 0
        for a, b in np.unique(np.stack([lab[has], kl[has]], 1), axis=0).tolist():
            pairs.add((a, table[b]))
    named = sorted({name for _, name in pairs})
    if not named:
        return np.concatenate(labels).astype(np.int64), []
    packed = sorted(p for p in pairs if p[0] >= 0)
    if classes is None and len(packed) == len(pairs) and [p[0] for p in packed] == list(range(len(named))):
        classes = [name for _, name in packed]  # the packed index: one label per class, every class present
    named = list(check_classes(named, classes, shards[0]))
    position = {c: i for i, c in enumerate(named)}
    out = []
    for kl, table in zip(klasses, tables, strict=True):
        lookup = np.array([position[c] for c in table] + [-1], np.int64)
        out.append(lookup[kl])  # klass -1 picks the trailing -1
    return np.concatenate(out), named

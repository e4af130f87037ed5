"""Datasets: image folders and file lists (.txt/.csv/.jsonl), sample photos, and `build_dataset`, the one entry
from a spec, which also opens the bundled set (`data/bundled.py`) and tar shards (`data/shards.py`: map-style through
a saved index, so the training sampler, its per-sample seeds and exact resume work on shards as on folders). Named
classes are indexed in one place (`check_classes`) for folders, file lists and shards alike.

Every dataset returns `(image, label, index)` with label -1 when unknown, or None for an unreadable image so
that one corrupt file never stops a run (`collate_skip_none` drops those samples from a batch).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, default_collate

from dinoforge.data.bundled import BundledDataset, bundled_item
from dinoforge.utils import DinoforgeError, eprint

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
MANIFEST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".csv", ".jsonl"})
Transform = Callable[[Image.Image], Any] | None


class CorruptImageError(DinoforgeError):
    """An image file that cannot be opened or decoded (truncated, not an image, missing)."""


def is_image_file(path: str | Path) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _scan(root: Path) -> tuple[list[Path], list[Path]]:
    """All files under root, split into (images, other files); hidden files and folders are ignored."""
    images, others = [], []
    for p in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(root).parts) or not p.is_file():
            continue
        (images if is_image_file(p) else others).append(p)
    return images, others


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively, in sorted order."""
    root = Path(root)
    if not root.is_dir():
        raise DinoforgeError(f"image folder not found: {root}")
    return _scan(root)[0]


def load_image(path: str | Path) -> Image.Image:
    """Open an image as 8-bit RGB (grey, 16-bit, RGBA and palette images converted).

    Raises CorruptImageError naming the file when it is missing, truncated or not an image."""
    return _rgb(path, path)


def decode_image(data: bytes, name: str) -> Image.Image:
    """An encoded image (the bytes of an image file, e.g. a shard member) as 8-bit RGB, like `load_image`;
    CorruptImageError naming `name` when the bytes do not decode."""
    return _rgb(io.BytesIO(data), name)


def _rgb(source: str | Path | io.BytesIO, name: str | Path) -> Image.Image:
    try:
        with Image.open(source) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency and EXIF warnings
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, dtype=np.float64)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                im = Image.fromarray(a.round().astype(np.uint8))
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"cannot read image {name}: {e}") from None


def load_item(name: str | Path, size: int = 32) -> Image.Image:
    """An image file (see `load_image`) or a bundled item name (on a canvas of `size` px), as RGB.

    Curation manifests of the bundled set list such names; CorruptImageError when the index is out of range."""
    item = bundled_item(name)
    if item is None:
        return load_image(name)
    split, full, index = item
    dataset = BundledDataset(split, size=size, full=full)  # cheap: the arrays are read once and cached
    if index >= len(dataset):
        raise CorruptImageError(f"no image {name}: the {split} split has {len(dataset)} images")
    return dataset.pil(index)


class _PathDataset(Dataset):
    """Images given by paths (or bundled item names, drawn on a `size` px canvas) and integer labels; corrupt
    images come back as None."""

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], transform: Transform = None, size: int = 32
    ) -> None:
        self.paths: list[Path] = list(paths)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64).reshape(len(self.paths))
        self.transform = transform
        self.size = size
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> Image.Image:
        return load_item(self.paths[index], self.size)

    def __getitem__(self, index: int):
        try:
            img = self._image(index)
        except CorruptImageError:
            return None
        return (self.transform(img) if self.transform else img), int(self.labels[index]), index

    def item_name(self, index: int) -> str:
        """A human-readable name of item `index` (its path) for file lists and reports."""
        return str(self.paths[index])


class CroppedPathDataset(_PathDataset):
    """Images given by paths, each cropped to its box `[x1, y1, x2, y2]` (original-image pixels; None = the
    whole image) before `transform`, as the revisited Oxford/Paris protocol crops its queries."""

    def __init__(self, paths: Sequence[Path], boxes: Sequence[Sequence[float] | None], transform: Transform = None):
        super().__init__(paths, [-1] * len(paths), transform)
        self.boxes = list(boxes)
        if len(self.boxes) != len(self.paths):
            raise DinoforgeError(f"{len(self.boxes)} boxes for {len(self.paths)} images")

    def _image(self, index: int) -> Image.Image:
        img, box = super()._image(index), self.boxes[index]
        return img if box is None else img.crop(tuple(box))


class ImageFolderDataset(_PathDataset):
    """A recursive image folder. When the root holds only sub-folders, each sub-folder is a class
    (ImageNet/ImageFolder layout) and `.classes`/`.labels` are set; otherwise every label is -1.

    `.ignored` lists files without an image extension (reported, never loaded)."""

    def __init__(self, root: str | Path, transform: Transform = None, classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DinoforgeError(f"image folder not found: {self.root}")
        paths, self.ignored = _scan(self.root)
        found = sorted({p.relative_to(self.root).parts[0] for p in paths if p.parent != self.root})
        if found and all(p.parent != self.root for p in paths):
            classes = check_classes(found, classes, self.root)
            index = {c: i for i, c in enumerate(classes)}
            labels = [index[p.relative_to(self.root).parts[0]] for p in paths]
        else:
            classes, labels = [], [-1] * len(paths)
        super().__init__(paths, labels, transform)
        self.classes = list(classes)


def check_classes(found: Sequence[str], classes: Sequence[str] | None, source: Path) -> Sequence[str]:
    """The class list to index labels by: `classes` (e.g. the train split's) when given, else `found`."""
    if classes is None:
        return found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DinoforgeError(f"{source}: class(es) {', '.join(unknown[:5])} not among the {len(classes)} train classes")
    return classes


def _parse_label(raw: Any) -> int | str:
    if isinstance(raw, bool):
        raise ValueError(f"label must be an integer or a class name, got {raw!r}")
    if isinstance(raw, int):
        return raw
    s = str(raw).strip()
    try:
        return int(s)
    except ValueError:
        return s


class FileListDataset(_PathDataset):
    """Images listed in a manifest. `.txt`/`.csv`: one path per line with an optional label after a tab or
    comma; `.jsonl`: objects with "path", optional "label" and any provenance fields (kept in `.records`).

    Relative paths resolve against the manifest's folder; bundled item names (`bundled:train/17`, what curating
    the bundled set writes) are drawn on a `size` px canvas. Labels are integers, or class names that are
    mapped to indices in sorted order (then `.classes` holds the names)."""

    def __init__(
        self,
        manifest: str | Path,
        transform: Transform = None,
        classes: Sequence[str] | None = None,
        size: int = 32,
    ) -> None:
        self.manifest = Path(manifest)
        if not self.manifest.is_file():
            raise DinoforgeError(f"file list not found: {self.manifest}")
        suffix = self.manifest.suffix.lower()
        if suffix not in MANIFEST_EXTENSIONS:
            raise DinoforgeError(f"unsupported file list {self.manifest}: use .txt, .csv or .jsonl")
        self.records: list[dict[str, Any]] = (
            self._read_jsonl() if suffix == ".jsonl" else self._read_lines(suffix == ".csv")
        )
        base = self.manifest.parent
        paths = [
            Path(r["path"]) if Path(r["path"]).is_absolute() or bundled_item(r["path"]) else base / r["path"]
            for r in self.records
        ]
        raw = [r.get("label") for r in self.records]
        named = sorted({x for x in raw if isinstance(x, str)})
        if named and any(isinstance(x, int) for x in raw):
            raise DinoforgeError(f"{self.manifest}: mixes integer labels and class names")
        if named:
            named = list(check_classes(named, classes, self.manifest))
        index = {c: i for i, c in enumerate(named)}
        labels = [-1 if x is None else index[x] if isinstance(x, str) else x for x in raw]
        super().__init__(paths, labels, transform, size)
        self.classes = named

    def _read_lines(self, csv: bool) -> list[dict[str, Any]]:
        records = []
        for lineno, line in enumerate(self.manifest.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "\t" in line:
                path, _, label = line.partition("\t")
            elif "," in line:
                path, _, label = line.rpartition(",")
            else:
                path, label = line, ""
            path, label = path.strip(), label.strip()
            if csv and lineno == 1 and path.lower() in ("path", "file", "filename", "image"):
                continue  # header row
            records.append({"path": path} | ({"label": _parse_label(label)} if label else {}))
        return records

    def _read_jsonl(self) -> list[dict[str, Any]]:
        records = []
        for lineno, line in enumerate(self.manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DinoforgeError(f"{self.manifest}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "path" not in rec:
                raise DinoforgeError(f'{self.manifest}:{lineno}: each line needs an object with a "path"')
            if rec.get("label") is not None:
                try:
                    rec["label"] = _parse_label(rec["label"])
                except ValueError as e:
                    raise DinoforgeError(f"{self.manifest}:{lineno}: {e}") from None
            records.append(rec)
        return records


def require_labels(labels: np.ndarray, spec: str, purpose: str) -> None:
    """One error line when `spec` holds unlabelled images (label -1) and `purpose` (e.g. "fine-tuning") needs labels."""
    if (np.asarray(labels) < 0).any():
        raise DinoforgeError(
            f"{spec} has unlabelled images: {purpose} needs class labels (one sub-folder per class, or a file list "
            "with labels)"
        )


def skipped_summary(names: Sequence[str]) -> dict[str, Any]:
    """The record of unreadable images a command skipped, for its JSON results and `report_skipped`:
    `skipped_images` (how many, each image once) and `first_skipped_image` (the first met, or None)."""
    names = list(dict.fromkeys(names))
    return {"skipped_images": len(names), "first_skipped_image": names[0] if names else None}


def report_skipped(summary: dict[str, Any]) -> None:
    """Tell the user at the end of a command that unreadable images were skipped: one stderr line
    `skipped N unreadable images (first: PATH)` from a `skipped_summary` record, nothing when none was."""
    if summary.get("skipped_images"):
        eprint(f"skipped {summary['skipped_images']} unreadable images (first: {summary['first_skipped_image']})")


def collate_skip_none(batch: list) -> Any:
    """Default-collate the samples that are not None (corrupt images); None when every sample was.

    The third field of the result holds the dataset indices that came back, so a caller can tell which
    indices of its request were skipped."""
    kept = [b for b in batch if b is not None]
    return default_collate(kept) if kept else None


def build_dataset(
    spec: str | Path,
    transform: Transform = None,
    split: str | None = None,
    size: int = 32,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Dataset from a spec: `bundled[:train|:val]`, `bundled-full[:split]`, an image folder, a `.txt`/`.csv`/`.jsonl`
    manifest or tar shards (`shards/{000000..000099}.tar`, read whole whatever the split). With a `split`, a folder
    that has such a sub-folder is read there (the bundled set defaults to train); without one, the whole folder tree.
    `size` applies to the bundled set; `classes` (e.g. the train split's) fixes the label index of named classes, so
    train and val labels agree."""
    s = str(spec)
    name, _, sub = s.partition(":")
    if name in ("bundled", "bundled-full") and not Path(s).exists():
        return BundledDataset(sub or split or "train", transform=transform, size=size, full=name == "bundled-full")
    from dinoforge.data.shards import ShardDataset, shard_files  # shards build on this module

    shards = shard_files(s)
    if shards is not None:
        return ShardDataset(shards, transform, classes)
    p = Path(s)
    if p.is_dir():
        return ImageFolderDataset(p / split if split and (p / split).is_dir() else p, transform, classes)
    if p.is_file():
        if p.suffix.lower() in MANIFEST_EXTENSIONS:
            return FileListDataset(p, transform, classes, size)
        raise DinoforgeError(f"not an image folder or a .txt/.csv/.jsonl file list: {p}")
    raise DinoforgeError(f"data not found: {p} (give a folder, a file list, shards.tar or 'bundled[:train|:val]')")


SAMPLE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
)


def load_sample_photos(names: Sequence[str] | None = None) -> dict[str, Image.Image]:
    """scikit-image's public-domain/CC0 colour photos (shipped in its wheel, no network) as RGB PIL images."""
    from skimage import data

    out: dict[str, Image.Image] = {}
    for name in names or SAMPLE_PHOTOS:
        if name in ("motorcycle_left", "motorcycle_right"):
            left, right, _ = data.stereo_motorcycle()
            arr = left if name == "motorcycle_left" else right
        elif name in SAMPLE_PHOTOS:
            arr = getattr(data, name)()
        else:
            raise DinoforgeError(f"unknown sample photo {name!r}; choose from {', '.join(SAMPLE_PHOTOS)}")
        out[name] = Image.fromarray(arr).convert("RGB")
    return out

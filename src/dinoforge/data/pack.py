"""`dinoforge data pack`: a folder, file list, curated manifest or bundled set written as tar shards in the webdataset
layout (webdataset's ShardWriter), which `ShardDataset` and any webdataset reader read, each with its saved index
(`data/shards.py`), so reading them starts without a pass over the tars.

A sample is three members with one key: `KEY.<ext>` (the original image file's bytes, unchanged: jpg, png, ...),
`KEY.cls` (its integer label, when it has one) and `KEY.json` ({"path": the original name, "label", "class" (its
class name, when the source names classes), and a curated manifest's or a re-packed shard's provenance fields}).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from dinoforge.data.datasets import BundledDataset, FileListDataset, bundled_item
from dinoforge.data.shards import ShardDataset, write_index
from dinoforge.utils import DinoforgeError, track, write_json

SHARD_NAME = "%06d.tar"  # shard file names in a packed folder: 000000.tar, 000001.tar, ...
PACK_RECORD = "pack.json"  # what `pack_shards` wrote: the shard spec, counts, unreadable files


def shard_spec(files: Sequence[Path]) -> str:
    """The brace pattern naming consecutive `SHARD_NAME` files of one folder (`out/{000000..000003}.tar`)."""
    folder, first, last = files[0].parent, files[0].name, files[-1].name
    return str(folder / first) if len(files) == 1 else f"{folder}/{{{first[:-4]}..{last[:-4]}}}.tar"


def _encoded(dataset: Dataset, index: int) -> tuple[bytes, str]:
    """(file bytes, extension) of item `index` of a dataset to pack: an image file's bytes unchanged, a shard
    member's as stored, a bundled image as PNG. OSError when the file cannot be read."""
    if isinstance(dataset, ShardDataset):
        return dataset.read_bytes(index), dataset.ext(index)
    if isinstance(dataset, BundledDataset) or bundled_item(dataset.paths[index]):
        image = dataset.pil(index) if isinstance(dataset, BundledDataset) else dataset._image(index)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), "png"
    path = Path(dataset.paths[index])
    return path.read_bytes(), path.suffix.lower().lstrip(".") or "jpg"


def pack_shards(dataset: Dataset, out_dir: str | Path, max_images: int = 10000, max_mb: float = 1000.0) -> dict:
    """Write `dataset` (a folder, file list, bundled set or shards: `build_dataset`'s) into tar shards of at most
    `max_images` images and about `max_mb` MB of file data each (a shard closes at the first image past it; tar
    headers are not counted), in the dataset's order.

    Returns (and writes as pack.json) the shard spec to read them with, the counts, and the files that could not be
    read (missing); files that do not decode are packed as they are and skipped when read, like corrupt files."""
    from webdataset import ShardWriter

    out_dir = Path(out_dir)
    if len(dataset) == 0:
        raise DinoforgeError("no images to pack")
    if out_dir.is_dir() and any(out_dir.glob("*.tar")):
        raise DinoforgeError(f"{out_dir} already holds .tar shards: pack into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(getattr(dataset, "classes", []))
    records = getattr(dataset, "records", None) if isinstance(dataset, FileListDataset) else None
    provenance = dataset.meta if isinstance(dataset, ShardDataset) else (lambda i: records[i] if records else {})
    name = getattr(dataset, "item_name", str)
    missing: list[str] = []
    written = 0
    with ShardWriter(str(out_dir / SHARD_NAME), maxcount=max_images, maxsize=max_mb * 1e6, verbose=0) as writer:
        for i in track(range(len(dataset)), "packing", total=len(dataset)):
            try:
                data, ext = _encoded(dataset, i)
            except OSError:
                missing.append(name(i))
                continue
            label = int(dataset.labels[i])
            meta = {k: v for k, v in provenance(i).items() if k not in ("path", "label", "class")}
            meta |= {"path": name(i), "label": label} | ({"class": classes[label]} if classes and label >= 0 else {})
            sample = {"__key__": f"{written:09d}", ext: data, "json": meta}
            writer.write(sample | ({"cls": label} if label >= 0 else {}))
            written += 1
    files = sorted(out_dir.glob("*.tar"))
    for f in files:
        write_index(f)
    record = {
        "spec": shard_spec(files),
        "images": written,
        "shards": len(files),
        "max_images": max_images,
        "max_mb": max_mb,
        "classes": classes,
        "missing": len(missing),
        "first_missing": missing[0] if missing else None,
    }
    write_json(out_dir / PACK_RECORD, record)
    return record

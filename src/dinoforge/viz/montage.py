"""Thumbnail sheets: one row of images per group (a cluster, or a kept image with its removed duplicates)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from dinoforge.data.datasets import CorruptImageError, load_item


def montage(paths: list[list[str]], out_png: str | Path, title: str, thumb: int = 64) -> Path | None:
    """Save a grid of image thumbnails, one row per group; unreadable images leave their cell blank."""
    rows = [r for r in paths if r]
    if not rows:
        return None
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (thumb + 2), len(rows) * (thumb + 2) + 16), "white")
    ImageDraw.Draw(sheet).text((2, 2), title, fill="black")
    for i, row in enumerate(rows):
        for j, p in enumerate(row):
            try:
                im = load_item(p).resize((thumb, thumb))
            except CorruptImageError:
                continue
            sheet.paste(im, (j * (thumb + 2), 16 + i * (thumb + 2)))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return Path(out_png)

"""The bundled Fashion-MNIST subset (10k train / 2k val, shipped in the package) and the full set from the Debian
package, as RGB images on a canvas; and the names (`bundled:train/17`) that curation manifests give its images."""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dinoforge.utils import DinoforgeError

if TYPE_CHECKING:
    from dinoforge.data.datasets import Transform

BUNDLED_NPZ = Path(__file__).resolve().parent / "bundled" / "fashion_mnist_subset.npz"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an (optionally gzipped) IDX file, the format of the MNIST family."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


_BUNDLED_ITEM = re.compile(r"(bundled|bundled-full):(train|val)/(\d+)")


def bundled_item(name: str | Path) -> tuple[str, bool, int] | None:
    """(split, full, index) when `name` names a bundled image the way `BundledDataset.item_name` writes it
    (`bundled:train/17`, `bundled-full:val/3`) and is not an existing file; else None."""
    m = _BUNDLED_ITEM.fullmatch(str(name))
    if m is None or Path(name).exists():
        return None
    return m[2], m[1] == "bundled-full", int(m[3])


@lru_cache(maxsize=4)
def _load_fashion_mnist(split: str, full: bool) -> tuple[np.ndarray, np.ndarray]:
    if not full:
        with np.load(BUNDLED_NPZ) as z:
            return z[f"{split}_images"], z[f"{split}_labels"].astype(np.int64)
    prefix = "train" if split == "train" else "t10k"
    img = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lab = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not (img.is_file() and lab.is_file()):
        raise DinoforgeError(
            f"full Fashion-MNIST not found in {FASHION_MNIST_DIR}: install the Debian package "
            "dataset-fashion-mnist, or use the bundled subset ('bundled')"
        )
    return read_idx(img), read_idx(lab).astype(np.int64)


class BundledDataset(Dataset):
    """Fashion-MNIST as RGB PIL images: the bundled class-balanced subset (10k train / 2k val), or with
    `full=True` the 60k/10k set from the Debian package. The 28 px images are placed on a black canvas of
    `size` px (28→32 by default, so a patch-4 ViT sees an 8×8 grid; larger sizes upscale the same layout)."""

    classes: list[str] = list(FASHION_MNIST_CLASSES)

    def __init__(self, split: str = "train", transform: Transform = None, size: int = 32, full: bool = False):
        if split not in ("train", "val"):
            raise DinoforgeError(f"split must be 'train' or 'val', got {split!r}")
        if size < 8:
            raise DinoforgeError(f"size must be at least 8 px, got {size}")
        self.split, self.transform, self.size, self.full = split, transform, size, full
        self.images, self.labels = _load_fashion_mnist(split, full)
        self._inner = max(1, round(size * 28 / 32)) if size != 28 else 28
        self._canvases = np.zeros((len(self.labels), size, size), dtype=np.uint8)  # drawn once each, on first use
        self._drawn = np.zeros(len(self.labels), dtype=bool)

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int) -> Image.Image:
        """Item `index` as an RGB PIL image of `size` px (its grey canvas is drawn once and kept: training reads
        every image each epoch)."""
        if not self._drawn[index]:
            img = Image.fromarray(self.images[index])
            if self._inner != 28:
                img = img.resize((self._inner, self._inner), Image.BICUBIC)
            canvas = Image.new("L", (self.size, self.size))
            off = (self.size - self._inner) // 2
            canvas.paste(img, (off, off))
            self._canvases[index] = np.asarray(canvas)
            self._drawn[index] = True
        return Image.fromarray(self._canvases[index]).convert("RGB")

    def __getitem__(self, index: int):
        img = self.pil(index)
        return (self.transform(img) if self.transform else img), int(self.labels[index]), index

    def item_name(self, index: int) -> str:
        """A stable name for item `index`, e.g. `bundled:val/17`."""
        return f"{'bundled-full' if self.full else 'bundled'}:{self.split}/{index}"

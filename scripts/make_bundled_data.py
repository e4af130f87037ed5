"""Regenerate the bundled Fashion-MNIST subset from the Debian package `dataset-fashion-mnist`.

Deterministic and class-balanced: 1,000 train images per class from the official train split and
200 validation images per class from the official test split (seed 0).
Usage: python scripts/make_bundled_data.py [--src /usr/share/datasets/fashion-mnist] [--out FILE.npz]
"""

import argparse
from pathlib import Path

import numpy as np

from dinoforge.data.bundled import read_idx

OUT = Path(__file__).resolve().parents[1] / "src/dinoforge/data/bundled/fashion_mnist_subset.npz"


def balanced(images: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator):
    idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
    idx = idx[rng.permutation(len(idx))]
    return images[idx], labels[idx].astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the .npz (default: the bundled file)")
    args = ap.parse_args()
    src = Path(args.src)
    rng = np.random.default_rng(0)
    xtr, ytr = balanced(
        read_idx(src / "train-images-idx3-ubyte.gz"), read_idx(src / "train-labels-idx1-ubyte.gz"), 1000, rng
    )
    xva, yva = balanced(
        read_idx(src / "t10k-images-idx3-ubyte.gz"), read_idx(src / "t10k-labels-idx1-ubyte.gz"), 200, rng
    )
    np.savez_compressed(args.out, train_images=xtr, train_labels=ytr, val_images=xva, val_labels=yva)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB): train {xtr.shape}, val {xva.shape}")


if __name__ == "__main__":
    main()

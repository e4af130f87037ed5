"""A labelled folder of larger images from another domain than Fashion-MNIST, and its k-NN probe.

`make OUT`: 96 px JPEG crops of 12 photos bundled in scikit-image (no network), one class per photo: the train
images are cropped from the left 65 % of each photo, the val images from the right 35 %, so a val image never
overlaps a train image (k-NN must recognise the texture or scene, not match pixels). 200 train + 50 val per class.

`knn TEACHER OUT`: cosine 20-NN top-1 on OUT/train → OUT/val for the trained teacher, a random init of the same
network (seed 0) and the raw pixels, all at the teacher's global crop size; prints one JSON line.

    python scripts/photo_patches.py make runs/photo_patches
    dinoforge train --data runs/photo_patches/train --time 10m -o runs/photo_auto
    python scripts/photo_patches.py knn runs/photo_auto/teacher_backbone.safetensors runs/photo_patches
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import typer
from omegaconf import OmegaConf
from PIL import Image, ImageEnhance

PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket",
)  # fmt: skip
SIDE, SPLIT_AT = 96, 0.65
PER_CLASS = {"train": 200, "val": 50}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def make(out: Path, seed: int = 0) -> None:
    """Write OUT/train/<photo>/*.jpg and OUT/val/<photo>/*.jpg."""
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = photo.size
        for split, n in PER_CLASS.items():
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            x_lo, x_hi = (0, int(SPLIT_AT * w)) if split == "train" else (int(SPLIT_AT * w), w)
            for i in range(n):
                s = int(rng.uniform(0.15, 0.33) * min(h, w))
                x, y = rng.integers(x_lo, x_hi - s + 1), rng.integers(0, h - s + 1)
                img = photo.crop((x, y, x + s, y + s)).resize((SIDE, SIDE), Image.BICUBIC)
                if rng.random() < 0.5:
                    img = img.transpose(Image.FLIP_LEFT_RIGHT)
                img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
                img.save(folder / f"{i:04d}.jpg", quality=90)
    print(f"{len(PHOTOS)} classes, {sum(PER_CLASS.values())} images each -> {out}")


@app.command()
def knn(teacher: Path, folder: Path) -> None:
    """k-NN top-1 of the teacher, a random init of its network, and raw pixels on FOLDER/train → FOLDER/val."""
    from dinoforge.data.datasets import build_dataset
    from dinoforge.data.transforms import eval_transform_for
    from dinoforge.eval.knn import backbone_knn_top1, knn_evaluate
    from dinoforge.models.weights import build_backbone, load_backbone

    size = int(OmegaConf.load(teacher.parent / "config.yaml").crops.global_crops_size)
    train, val = str(folder / "train"), str(folder / "val")
    trained = load_backbone(teacher)
    torch.manual_seed(0)
    random_init = build_backbone(trained.arch)
    result = {"image_size": size}
    for name, net in (("teacher", trained), ("random_init", random_init)):
        top1 = backbone_knn_top1(net, train, val, k=20, image_size=size)
        result[name] = {k: round(v / 100, 4) for k, v in top1.items()}

    transform, _ = eval_transform_for(train, size, 1)
    tr = build_dataset(train, transform=transform)
    va = build_dataset(val, transform=transform, classes=tr.classes)

    def pixels(ds) -> tuple[torch.Tensor, torch.Tensor]:
        items = [ds[i] for i in range(len(ds))]
        return torch.stack([x.flatten() for x, _, _ in items]), torch.tensor([y for _, y, _ in items])

    res = knn_evaluate(*pixels(tr), *pixels(va), ks=(20,))
    result["raw_pixels"] = round(res["full"]["k=20"]["top1"] / 100, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    app()

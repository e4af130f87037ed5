"""The demo's k-NN check on images it never saw: the whole Fashion-MNIST (60k train → 10k test, of which the demo
trained on 10k and validated on 2k), for a trained backbone, the same architecture at random init, and raw pixels.

Needs Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`).
Usage: python scripts/heldout_knn.py runs/demo/train/teacher_backbone.safetensors [--size 24] [--init xavier]
"""

from __future__ import annotations

import argparse
import json

import torch

from dinoforge.demo import KNN_K, raw_pixel_knn
from dinoforge.eval.knn import backbone_knn_top1
from dinoforge.models.weights import build_backbone, load_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", help="trained backbone (e.g. runs/demo/train/teacher_backbone.safetensors)")
    ap.add_argument("--size", type=int, default=24, help="evaluation side length (the demo's global crop size)")
    ap.add_argument("--init", default="xavier", help="init of the random-init baseline (the demo's student.init)")
    args = ap.parse_args()
    trained = load_backbone(args.weights)
    torch.manual_seed(0)
    random_init = build_backbone(trained.arch)
    random_init.init_weights(args.init)
    specs = dict(train_spec="bundled-full:train", val_spec="bundled-full:val", k=KNN_K, image_size=args.size)
    result = {
        "trained": backbone_knn_top1(trained, **specs),
        "random_init": backbone_knn_top1(random_init, **specs),
        "raw_pixels": raw_pixel_knn(full=True),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

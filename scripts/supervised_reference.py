"""A ceiling for the demo: the demo's ViT trained *with labels* for as many steps as the demo pretrains.

Builds the student of the `demo` preset (same architecture, LayerScale and seed), trains it with cross-entropy on
the CLS token of the bundled 10k train split at the global crop size (random horizontal flips, AdamW), and prints
the same k-NN top-1 the demo reports (cosine 20-NN, T = 0.07, bundled val) after each number of steps in --steps.
Label supervision is the best a label-free recipe can hope to match, so these figures bound what the demo's
self-supervised run can reach in its step budget.

A strong *supervised* teacher for distillation: --depth/--embed-dim/--num-heads/--layerscale change the
architecture (same patch, crop size and seed), and --save PATH.safetensors writes the trained backbone after the
last step (save_backbone: a weights file for every command, e.g. student.pretrained_weights=PATH).
Usage: python scripts/supervised_reference.py [--steps 156 600] [--lr 1e-3] [--threads 2]
       [--depth 8] [--embed-dim 128] [--num-heads 4] [--layerscale 1e-5] [--save runs/supervised.safetensors]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dinoforge.config.config import load_config
from dinoforge.data.datasets import BundledDataset
from dinoforge.data.transforms import normalize_transform
from dinoforge.eval.knn import backbone_knn_top1
from dinoforge.models.weights import build_backbone, save_backbone
from dinoforge.train.meta_arch import backbone_kwargs
from dinoforge.train.recipe import resolve_recipe


def main() -> None:
    cfg = load_config("demo", [])
    resolve_recipe(cfg, len(BundledDataset("train")))  # the demo's resolved student (LayerScale) and step count
    demo_steps = cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[demo_steps],
        help=f"evaluate after these steps (default: the demo's {demo_steps})",
    )
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=cfg.student.depth, help="transformer blocks (default: the demo's)")
    ap.add_argument("--embed-dim", type=int, default=cfg.student.embed_dim, help="width (default: the demo's)")
    ap.add_argument("--num-heads", type=int, default=cfg.student.num_heads, help="attention heads (the demo's)")
    ap.add_argument(
        "--layerscale", type=float, default=cfg.student.layerscale, help="LayerScale init (default: the demo's)"
    )
    ap.add_argument("--save", type=Path, help="write the supervised backbone here (.safetensors) after the last step")
    args = ap.parse_args()
    if min(args.steps) < 1:
        ap.error("--steps must be positive")
    if min(args.depth, args.embed_dim, args.num_heads) < 1 or args.embed_dim % args.num_heads:
        ap.error("--depth, --embed-dim and --num-heads must be positive, --embed-dim a multiple of --num-heads")
    if args.save is not None and args.save.suffix != ".safetensors":
        ap.error("--save must name a .safetensors file")
    cfg.student.update(depth=args.depth, embed_dim=args.embed_dim, num_heads=args.num_heads, layerscale=args.layerscale)
    torch.set_num_threads(args.threads)

    size, batch = cfg.crops.global_crops_size, cfg.train.batch_size_per_gpu
    data = BundledDataset("train", transform=normalize_transform(), size=size)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.from_numpy(data.labels).long()

    torch.manual_seed(cfg.train.seed)
    net = build_backbone(backbone_kwargs(cfg))
    head = torch.nn.Linear(net.embed_dim, len(data.classes))
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    results, done = [], 0
    for target in sorted(set(args.steps)):
        net.train()
        for _ in range(done, target):
            idx = torch.randint(0, len(images), (batch,))
            x = images[idx]
            flip = torch.rand(batch) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = F.cross_entropy(head(net.forward_features(x)["x_norm_clstoken"]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        done = target
        knn = backbone_knn_top1(net.eval(), image_size=size)
        results.append(
            {"steps": target, "train_loss": round(loss.item(), 4), **{k: round(v / 100, 4) for k, v in knn.items()}}
        )
        print(json.dumps(results[-1]), flush=True)
    print(
        f"demo preset: {demo_steps} steps of {batch} images; supervised k-NN top-1 "
        + ", ".join(f"{r['cls+avgpool']:.4f} after {r['steps']}" for r in results)
        + " (CLS ⊕ mean patch)"
    )
    if args.save is not None:
        print(f"supervised backbone ({args.depth} blocks, {args.embed_dim} wide): {save_backbone(net, args.save)}")


if __name__ == "__main__":
    main()

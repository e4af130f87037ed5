"""Why the official init loses on a short run from scratch, and what replaces it: the demo preset for a fixed number
of steps from several backbone inits and LayerScale values, each scored by the demo's k-NN (bundled 10k → 2k,
CLS ⊕ mean patch). Every variant costs the same per step, so equal steps are equal time. Also writes, per init,
the untrained net's k-NN and how much each block's branches add to the residual stream.

    python scripts/init_ablation.py --steps 104 --out runs/init_ablation
    python scripts/init_ablation.py --variants xavier,official --steps 104

Variants (NAME): official (trunc-normal 0.02), xavier (the recipe's `student.init: xavier`), std<S> (trunc-normal S on
every Linear and the patch embedding, CLS N(0, 0.02)), each with `:ls<L>` for LayerScale L (default: the small
recipe's 0.1), and `+key=value` for any other override, e.g. `xavier:ls1`, `std0.06`, `xavier+optim.base_lr=0.008`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dinoforge.config.config import load_config
from dinoforge.demo import KNN_K
from dinoforge.eval.knn import backbone_knn_top1, knn_callback
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.train.loop import train
from dinoforge.train.meta_arch import backbone_kwargs
from dinoforge.train.recipe import resolve_recipe
from dinoforge.utils import write_json


@contextmanager
def std_init(std: float | None):
    """While active, `init_weights("xavier")` draws trunc-normal `std` instead (None: leave it alone)."""
    real = DinoVisionTransformer.init_weights

    def init(self, scheme="official"):
        real(self, scheme)
        if scheme == "xavier" and std is not None:
            nn.init.trunc_normal_(self.patch_embed.proj.weight, std=std)
            for m in self.blocks.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=std)

    DinoVisionTransformer.init_weights = init
    try:
        yield
    finally:
        DinoVisionTransformer.init_weights = real


def parse(name: str) -> tuple[list[str], float | None]:
    name, *extra = name.split("+")
    base, _, ls = name.partition(":ls")
    overrides = [f"train.small_recipe.layerscale={float(ls)}"] if ls else []
    overrides += extra
    overrides.append(f"train.small_recipe.init={'official' if base == 'official' else 'xavier'}")
    if base == "official":
        return overrides, None
    return overrides, (float(base[3:]) if base.startswith("std") else None)


@torch.no_grad()
def branch_share(net: DinoVisionTransformer, images: torch.Tensor) -> list[float]:
    """Per block: ‖attention + MLP branch output‖ / ‖residual stream‖ at the block's input (mean over tokens)."""
    shares = []
    x = net.prepare_tokens_with_masks(images)
    for blk in net.blocks:
        y = blk(x)
        shares.append(float(((y - x).norm(dim=-1) / x.norm(dim=-1)).mean()))
        x = y
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="official,xavier,std0.06,xavier:ls1,xavier:ls0.01")
    ap.add_argument("--steps", type=int, default=104)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/init_ablation"))
    ap.add_argument("--no-init-stats", action="store_true", help="skip the untrained net's k-NN and branch shares")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants.split(","):
        overrides, std = parse(name)
        overrides += [f"train.max_iterations={args.steps}", f"train.seed={args.seed}"]
        overrides += ["evaluation.eval_period_iterations=0", f"train.checkpoint_period_iterations={args.steps}"]
        cfg = load_config("demo", overrides)
        with std_init(std):
            probe = load_config("demo", overrides)
            resolve_recipe(probe, 10_000)
            torch.manual_seed(args.seed)
            net = DinoVisionTransformer(**backbone_kwargs(probe))
            net.init_weights(probe.student.init)
            size = probe.crops.global_crops_size
            at_init, shares = {}, []
            if not args.no_init_stats:
                at_init = backbone_knn_top1(net, "bundled:train", "bundled:val", k=KNN_K, image_size=size)
                shares = branch_share(net, torch.randn(16, 3, size, size))
            with tempfile.TemporaryDirectory() as tmp:
                summary = train(
                    cfg,
                    Path(tmp),
                    data="bundled:train",
                    quiet=True,
                    evaluate=knn_callback("bundled:train", "bundled:val", k=KNN_K, image_size=size),
                )
        results[name] = {
            "overrides": overrides,
            "knn_at_init": at_init,
            "branch_share_at_init": [round(v, 4) for v in shares],
            "knn_trained": {k.removeprefix("knn_top1_"): v for k, v in summary["eval"].items()},
            "images_per_s": summary["last"]["images_per_s"],
        }
        print(json.dumps({"variant": name, **results[name]}), flush=True)
        write_json(args.out / "init_ablation.json", {"steps": args.steps, "seed": args.seed, "variants": results})


if __name__ == "__main__":
    main()

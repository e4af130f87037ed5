"""dinoforge.models: the DINOv2 ViT backbone and its weights I/O."""

from dinoforge.models.vision_transformer import (
    DinoVisionTransformer,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)


def __getattr__(name: str):
    if name in ("load_backbone", "save_backbone"):
        from dinoforge.models import weights

        return getattr(weights, name)
    raise AttributeError(name)


__all__ = [
    "DinoVisionTransformer",
    "load_backbone",
    "save_backbone",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]

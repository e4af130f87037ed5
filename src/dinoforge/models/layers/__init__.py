"""Building blocks of the DINOv2 Vision Transformer (official parameter names)."""

from dinoforge.models.layers.attention import Attention
from dinoforge.models.layers.block import Block
from dinoforge.models.layers.drop_path import DropPath, drop_add_residual_stochastic_depth, drop_path
from dinoforge.models.layers.layer_scale import LayerScale
from dinoforge.models.layers.mlp import Mlp
from dinoforge.models.layers.packing import PACKING_BACKENDS, PackedLayout
from dinoforge.models.layers.patch_embed import PatchEmbed
from dinoforge.models.layers.swiglu import SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PACKING_BACKENDS",
    "PackedLayout",
    "PatchEmbed",
    "SwiGLUFFNFused",
    "drop_add_residual_stochastic_depth",
    "drop_path",
    "swiglu_hidden_features",
]

"""Pre-norm transformer block with LayerScale and stochastic depth; accepts a tensor or a list of tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinoforge.models.layers.attention import Attention
from dinoforge.models.layers.drop_path import DropPath, drop_add_residual_stochastic_depth
from dinoforge.models.layers.layer_scale import LayerScale


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    Each branch has its own DropPath (the official code reuses the attention one for the MLP below
    rate 0.1). Above 0.1 in training the branch is computed on the kept subset of the batch only.
    With `activation_checkpointing` set, a forward that records gradients keeps only the block's input and
    recomputes the rest in backward (same random drop-path draws).
    """

    activation_checkpointing: bool = False

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn: nn.Module,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ffn
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)
        self.sample_drop_ratio = drop_path

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x: Tensor) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, self._attn_branch, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, self._ffn_branch, self.sample_drop_ratio)
        x = x + self.drop_path1(self._attn_branch(x))
        return x + self.drop_path2(self._ffn_branch(x))

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward_any, x, use_reentrant=False)
        return self._forward_any(x)

    def _forward_any(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x, list):
            return [self._forward(t) for t in x]
        return self._forward(x)

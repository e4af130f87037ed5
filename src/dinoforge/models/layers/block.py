"""Pre-norm transformer block with LayerScale and stochastic depth; accepts a tensor, a list of tensors, or packed
tokens with their layout."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinoforge.models.layers.attention import Attention
from dinoforge.models.layers.drop_path import DropPath, drop_add_residual_stochastic_depth, keep_scale, kept_samples
from dinoforge.models.layers.layer_scale import LayerScale
from dinoforge.models.layers.packing import PackedLayout


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

    def _attn_branch(self, x: Tensor, layout: PackedLayout | None = None) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), layout))

    def _ffn_branch(self, x: Tensor, layout: PackedLayout | None = None) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def _forward(self, x: Tensor) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, self._attn_branch, self.sample_drop_ratio)
            return drop_add_residual_stochastic_depth(x, self._ffn_branch, self.sample_drop_ratio)
        x = x + self.drop_path1(self._attn_branch(x))
        return x + self.drop_path2(self._ffn_branch(x))

    def _forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """The block on packed [N, D] tokens, with the per-crop path's random draws, drawn in its order (each
        group's attention then FFN branch), so that both paths give the same result under the same seed."""
        if not self.training or self.sample_drop_ratio <= 0:
            x = x + self._attn_branch(x, layout)
            return x + self._ffn_branch(x, layout)
        r, efficient = self.sample_drop_ratio, self.sample_drop_ratio > 0.1
        draws = [
            tuple(kept_samples(b, r, x.device) if efficient else keep_scale(x, b, r) for _ in range(2))
            for b, _ in layout.groups
        ]
        for i, branch in enumerate((self._attn_branch, self._ffn_branch)):
            step = _subset_residual if efficient else _scaled_residual
            x = step(x, layout, branch, [d[i] for d in draws])
        return x

    def forward(self, x: Tensor | list[Tensor], layout: PackedLayout | None = None) -> Tensor | list[Tensor]:
        """One block over a [B, T, D] batch, a list of them (crops of different sizes), or packed [N, D] tokens;
        with `activation_checkpointing` set, recomputed in backward instead of keeping its activations."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward_any, x, layout, use_reentrant=False)
        return self._forward_any(x, layout)

    def _forward_any(self, x: Tensor | list[Tensor], layout: PackedLayout | None) -> Tensor | list[Tensor]:
        if layout is not None:
            return self._forward_packed(x, layout)
        if isinstance(x, list):
            return [self._forward(t) for t in x]
        return self._forward(x)


Branch = Callable[[Tensor, PackedLayout], Tensor]


def _scaled_residual(x: Tensor, layout: PackedLayout, branch: Branch, scales: list[Tensor]) -> Tensor:
    """DropPath on packed tokens: x + branch(x) times each crop's keep factor."""
    return x + branch(x, layout) * layout.per_token(scales)


def _subset_residual(x: Tensor, layout: PackedLayout, branch: Branch, kept: list[Tensor]) -> Tensor:
    """Efficient stochastic depth on packed tokens: the branch on the kept crops only, added back scaled by
    crops/kept of their group."""
    rows, sub = layout.select(kept)
    groups = zip(kept, layout.groups, strict=True)
    scale = sub.per_token([x.new_full((len(i),), b / max(len(i), 1)) for i, (b, _) in groups])
    return x.index_add(0, rows, branch(x[rows], sub).to(x.dtype) * scale)

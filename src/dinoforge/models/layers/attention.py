"""Multi-head self-attention through torch's scaled_dot_product_attention (no xFormers)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.models.layers.packing import PackedLayout


class Attention(nn.Module):
    """Fused qkv projection, SDPA, output projection; official key names `qkv` and `proj`."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def forward(self, x: Tensor, layout: PackedLayout | None = None) -> Tensor:
        """Attention over [B, T, D] tokens, or over packed [N, D] tokens within each crop of `layout`."""
        if layout is not None:
            n, d = x.shape
            q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
            return self.proj(layout.attention(q, k, v).reshape(n, d))
        b, n, d = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def attention_weights(self, x: Tensor) -> Tensor:
        """Softmax attention probabilities [B, heads, T, T] for the (already normalised) input tokens."""
        q, k, _ = self._qkv(x)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

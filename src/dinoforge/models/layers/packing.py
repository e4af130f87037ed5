"""Sequence packing: crops of different token counts as one token sequence, attention kept inside each crop.

The packed tokens are one dense [N, D] tensor (groups of equal-length crops, one after the other, each crop's tokens
contiguous), so norms, linears and MLPs run once over all crops; only attention needs the crop boundaries. Two
block-diagonal attention backends: "njt" (nested jagged tensors through SDPA: varlen flash / memory-efficient kernels
on CUDA; on CPU SDPA's math backend, which pads every crop to the longest) and "flex" (`flex_attention` with a block
mask: compiled on CUDA; eager and forward-only on CPU, where torch has no flex backward).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from dinoforge.utils import DinoforgeError

PACKING_BACKENDS = ("njt", "flex")


@cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class PackedLayout:
    """Where each crop lies in a packed [N, D] token tensor: `groups` of (crops, tokens per crop), in order."""

    def __init__(self, groups: Sequence[tuple[int, int]], backend: str, device: torch.device | str) -> None:
        if backend not in PACKING_BACKENDS:
            raise DinoforgeError(f"unknown packing backend {backend!r}; choose one of {', '.join(PACKING_BACKENDS)}")
        self.groups = tuple((int(b), int(n)) for b, n in groups)
        self.backend = backend
        self.device = torch.device(device)
        self.lengths = [n for b, n in self.groups for _ in range(b)]
        self.num_tokens = sum(self.lengths)
        self.offsets = torch.tensor([0, *accumulate(self.lengths)], device=self.device)
        self._subsets: dict[tuple[int, ...], PackedLayout] = {}
        self._block_mask = None

    def pack(self, tokens: Sequence[Tensor]) -> Tensor:
        """[b, n, D] per group -> [N, D]."""
        return torch.cat([t.flatten(0, 1) for t in tokens])

    def unpack(self, x: Tensor) -> list[Tensor]:
        """[N, D] -> [b, n, D] views per group."""
        parts = x.split([b * n for b, n in self.groups])
        return [p.view(b, n, x.shape[-1]) for p, (b, n) in zip(parts, self.groups, strict=True)]

    def per_token(self, values: Sequence[Tensor]) -> Tensor:
        """One value per crop ([b] per group) repeated over the crop's tokens: [N, 1]."""
        return torch.cat([v.repeat_interleave(n) for v, (_, n) in zip(values, self.groups, strict=True)]).unsqueeze(1)

    def select(self, kept: Sequence[Tensor]) -> tuple[Tensor, PackedLayout]:
        """Token rows of the kept crops (crop indices within each group) and the layout of those rows."""
        rows, start = [], 0
        for idx, (b, n) in zip(kept, self.groups, strict=True):
            rows.append((start + idx.unsqueeze(1) * n + torch.arange(n, device=idx.device)).flatten())
            start += b * n
        sizes = tuple(len(i) for i in kept)
        if sizes not in self._subsets:
            groups = [(k, n) for k, (_, n) in zip(sizes, self.groups, strict=True)]
            self._subsets[sizes] = PackedLayout(groups, self.backend, self.device)
        return torch.cat(rows), self._subsets[sizes]

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Softmax attention of [N, heads, head_dim] queries/keys/values, each crop attending to itself only."""
        if self.backend == "njt":
            bounds = dict(min_seqlen=min(self.lengths, default=0), max_seqlen=max(self.lengths, default=0))
            # contiguous values: SDPA's only CPU backend for NJTs (math) needs them, else it finds no kernel
            q, k, v = (
                torch.nested.nested_tensor_from_jagged(t.contiguous(), self.offsets, **bounds).transpose(1, 2)
                for t in (q, k, v)
            )
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()
        return self._flex(q, k, v)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        on_cpu = q.device.type == "cpu"
        if on_cpu and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise DinoforgeError(
                f"flex_attention has no backward on CPU in torch {torch.__version__}: "
                "train with packing 'njt' or without packing"
            )
        if self._block_mask is None:
            crop = torch.repeat_interleave(
                torch.arange(len(self.lengths), device=self.device), torch.tensor(self.lengths, device=self.device)
            )

            def same_crop(b: Tensor, h: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
                return crop[qi] == crop[ki]

            n = self.num_tokens
            self._block_mask = create_block_mask(same_crop, None, None, n, n, device=self.device, _compile=not on_cpu)
        attend = flex_attention if on_cpu else _compiled_flex_attention()
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        return attend(q, k, v, block_mask=self._block_mask).squeeze(0).transpose(0, 1)

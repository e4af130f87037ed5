"""Stochastic depth: per-sample DropPath and the subset-of-batch residual used at high drop rates."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Zero whole samples of a residual branch with probability `drop_prob`, rescaling the kept ones."""
    if drop_prob <= 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of `drop_path` (one instance per residual branch)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def drop_add_residual_stochastic_depth(x: Tensor, residual_fn: Callable[[Tensor], Tensor], drop_ratio: float) -> Tensor:
    """x + branch(x) computed only on a random kept subset of the batch, scaled by batch/kept.

    Same expectation as DropPath but skips the dropped samples' compute (worth it above ~10% drop).
    """
    b = x.shape[0]
    kept = max(int(b * (1.0 - drop_ratio)), 1)
    idx = torch.randperm(b, device=x.device)[:kept]
    residual = residual_fn(x[idx])
    out = torch.index_add(x.flatten(1), 0, idx, residual.flatten(1).to(x.dtype), alpha=b / kept)
    return out.view_as(x)

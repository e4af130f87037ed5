"""Stochastic depth: per-sample DropPath and the subset-of-batch residual used at high drop rates."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def keep_scale(x: Tensor, n: int, drop_prob: float) -> Tensor:
    """DropPath's random factor for `n` samples: 0 (dropped, probability `drop_prob`) or 1/keep, shape [n]."""
    keep = 1.0 - drop_prob
    return x.new_empty(n).bernoulli_(keep).div_(keep)


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Zero whole samples of a residual branch with probability `drop_prob`, rescaling the kept ones."""
    if drop_prob <= 0.0 or not training:
        return x
    return x * keep_scale(x, x.shape[0], drop_prob).view((x.shape[0],) + (1,) * (x.ndim - 1))


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
    idx = kept_samples(b, drop_ratio, x.device)
    residual = residual_fn(x[idx])
    out = torch.index_add(x.flatten(1), 0, idx, residual.flatten(1).to(x.dtype), alpha=b / max(len(idx), 1))
    return out.view_as(x)


def kept_samples(b: int, drop_ratio: float, device: torch.device) -> Tensor:
    """Random indices of the max(int(b·(1 − drop_ratio)), 1) samples whose residual branch is computed."""
    return torch.randperm(b, device=device)[: max(int(b * (1.0 - drop_ratio)), 1)]

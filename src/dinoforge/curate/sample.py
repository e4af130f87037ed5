"""Balanced hierarchical sampling (Vo et al. 2024): split the target evenly over the top-level clusters, then
recursively over their sub-clusters, so a long-tailed pool comes out flattened."""

from __future__ import annotations

import numpy as np

from dinoforge.curate.kmeans import Hierarchy
from dinoforge.utils import DinoforgeError


def split_budget(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Share `target` over clusters as evenly as their sizes allow (water-filling): each gets min(cap, size),
    with the cap chosen so the shares sum to target; leftover units go to random clusters above the cap."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    share = np.minimum(sizes, lo)
    extra = target - int(share.sum())
    if extra:
        share[rng.choice(np.nonzero(sizes > lo)[0], size=extra, replace=False)] += 1
    return share


def balanced_sample(hierarchy: Hierarchy, target: int, strategy: str = "random", seed: int = 0) -> np.ndarray:
    """Pick `target` distinct points (sorted indices) by balanced hierarchical sampling over the cluster tree.

    strategy 'random' samples uniformly inside each leaf cluster; 'closest' takes the points nearest its
    centroid.
    """
    if strategy not in ("random", "closest"):
        raise DinoforgeError(f"unknown sampling strategy {strategy!r} (choose random or closest)")
    levels = hierarchy.levels
    n = len(levels[0].assign)
    if target <= 0:
        raise DinoforgeError(f"target size must be positive, got {target}")
    rng = np.random.default_rng(seed)
    # members[l][c]: children of cluster c at level l (points for l = 0, clusters of level l-1 otherwise).
    members = [_group(lvl.assign, len(lvl.centroids)) for lvl in levels]
    if strategy == "closest":
        members[0] = [m[np.argsort(levels[0].sqdist[m], kind="stable")] for m in members[0]]
    sizes = [np.array([len(m) for m in members[0]], np.int64)]
    for lvl in range(1, len(levels)):
        sizes.append(np.array([sizes[-1][m].sum() for m in members[lvl]], np.int64))

    picked: list[np.ndarray] = []

    def visit(lvl: int, cluster: int, budget: int) -> None:
        if budget == 0:
            return
        kids = members[lvl][cluster]
        if lvl == 0:
            picked.append(kids[:budget] if strategy == "closest" else rng.choice(kids, budget, replace=False))
            return
        for kid, share in zip(kids, split_budget(sizes[lvl - 1][kids], budget, rng), strict=True):
            visit(lvl - 1, int(kid), int(share))

    top = len(levels) - 1
    for c, share in enumerate(split_budget(sizes[top], min(target, n), rng)):
        visit(top, c, int(share))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def _group(assign: np.ndarray, k: int) -> list[np.ndarray]:
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(k + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(k)]


def size_entropy(labels: np.ndarray) -> float:
    """Normalised entropy (0..1) of the label distribution: 1 means perfectly balanced."""
    counts = np.bincount(np.asarray(labels))
    counts = counts[counts > 0]
    if len(counts) <= 1:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))

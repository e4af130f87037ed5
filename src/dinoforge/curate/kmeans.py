"""k-means for curation: faiss in memory, a streaming Lloyd over shards that also runs distributed
(torch.distributed all-reduce of centroid sums and counts), and hierarchical k-means with resampling (Vo
et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
from scipy.sparse import csr_matrix

from dinoforge import distributed
from dinoforge.curate.store import Data, dim, iter_batches, num_rows, row_range, take_rows, to_array
from dinoforge.utils import DinoforgeError, track


@dataclass
class KMeansResult:
    """Centroids (k, d) float32, each point's cluster (n,), its squared distance (n,), and the inertia
    (sum)."""

    centroids: np.ndarray
    assign: np.ndarray
    sqdist: np.ndarray
    inertia: float


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def flat_index(d: int, metric: str = "l2", gpu: bool = False) -> faiss.Index:
    """Exact faiss index (L2 or inner product), moved to all GPUs when asked and available."""
    index = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
    if gpu:
        if not gpu_available():
            raise DinoforgeError("GPU faiss requested but this faiss build has no GPU support or sees no GPU")
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def assign_to_centroids(
    data: Data, centroids: np.ndarray, batch_size: int = 65536, gpu: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) for every row, batch by batch: (assign int64, squared distance float32)."""
    index = flat_index(centroids.shape[1], "l2", gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    n = num_rows(data)
    assign = np.empty(n, np.int64)
    sqd = np.empty(n, np.float32)
    for start, xb in iter_batches(data, batch_size):
        dd, ii = index.search(xb, 1)
        assign[start : start + len(xb)] = ii[:, 0]
        sqd[start : start + len(xb)] = np.maximum(dd[:, 0], 0)
    return assign, sqd


def kmeans_faiss(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    gpu: bool = False,
    init: np.ndarray | None = None,
    nredo: int = 1,
) -> KMeansResult:
    """faiss.Kmeans on an in-memory array, trained on all points (no subsampling), best of `nredo` random
    starts (or from `init`), then a full assignment."""
    x = to_array(x) if not isinstance(x, np.ndarray) else np.ascontiguousarray(x, dtype=np.float32)
    _check(len(x), k)
    if gpu and not gpu_available():
        raise DinoforgeError("GPU faiss requested but this faiss build has no GPU support or sees no GPU")
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        gpu=gpu,
        max_points_per_centroid=len(x) + 1,
        min_points_per_centroid=1,
        nredo=nredo if init is None else 1,
        verbose=False,
    )
    km.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    assign, sqd = assign_to_centroids(x, centroids, gpu=gpu)
    return KMeansResult(centroids, assign, sqd, float(sqd.astype(np.float64).sum()))


def _check(n: int, k: int) -> None:
    if n == 0:
        raise DinoforgeError("k-means on an empty set of embeddings")
    if k < 1 or k > n:
        raise DinoforgeError(f"k-means needs 1 <= k <= number of points, got k={k}, n={n}")


def kmeans_lloyd(
    data: Data,
    k: int,
    niter: int = 20,
    seed: int = 0,
    batch_size: int = 65536,
    gpu: bool = False,
    init: np.ndarray | None = None,
    progress: bool = False,
) -> KMeansResult:
    """Streaming Lloyd k-means over an array or memory-mapped shards; distributed when torch.distributed
    is up.

    In a distributed run each rank passes its own slice of the rows; initial centroids are drawn from
    global row
    indices and sums/counts are all-reduced in float64, so any number of ranks gives the same centroids.
    Assignments returned are those of the local rows. Empty clusters keep their previous centroid.
    """
    d = dim(data) if num_rows(data) else (init.shape[1] if init is not None else 0)
    n_local = num_rows(data)
    world = distributed.world_size()
    sizes = torch.tensor([n_local], dtype=torch.int64)
    if world > 1:
        gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(gathered, sizes)
        offset = int(sum(int(g) for g in gathered[: distributed.rank()]))
        n_total = int(sum(int(g) for g in gathered))
        d = int(_all_max(d))
    else:
        offset, n_total = 0, n_local
    _check(n_total, k)
    if init is None:
        rows = np.sort(np.random.default_rng(seed).choice(n_total, size=k, replace=False))
        centroids = _gather_global_rows(data, rows, offset, d)
    else:
        centroids = np.asarray(init, dtype=np.float64)
    steps = range(niter)
    for _ in track(steps, "k-means", total=niter) if progress else steps:
        sums = torch.zeros(k, d, dtype=torch.float64)
        counts = torch.zeros(k, dtype=torch.float64)
        index = flat_index(d, "l2", gpu)
        index.add(centroids.astype(np.float32))
        for _, xb in iter_batches(data, batch_size):
            _, ii = index.search(xb, 1)
            a = ii[:, 0]
            onehot = csr_matrix((np.ones(len(a)), (a, np.arange(len(a)))), shape=(k, len(a)))
            sums += torch.from_numpy(onehot @ xb.astype(np.float64))
            counts += torch.from_numpy(np.bincount(a, minlength=k).astype(np.float64))
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        nonempty = counts > 0
        new = torch.from_numpy(centroids).clone()
        new[nonempty] = sums[nonempty] / counts[nonempty, None]
        centroids = new.numpy()
    c32 = np.ascontiguousarray(centroids, dtype=np.float32)
    if n_local:
        assign, sqd = assign_to_centroids(data, c32, batch_size, gpu)
    else:
        assign, sqd = np.zeros(0, np.int64), np.zeros(0, np.float32)
    inertia = torch.tensor([float(sqd.astype(np.float64).sum())], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(inertia)
    return KMeansResult(c32, assign, sqd, float(inertia))


def _all_max(v: int) -> int:
    t = torch.tensor([v], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _gather_global_rows(data: Data, rows: np.ndarray, offset: int, d: int) -> np.ndarray:
    """Rows by global index, each contributed by the rank holding it (all-reduce sum of a zero-padded
    matrix)."""
    out = np.zeros((len(rows), d), np.float64)
    n_local = num_rows(data)
    mine = np.nonzero((rows >= offset) & (rows < offset + n_local))[0]
    if len(mine):
        out[mine] = take_rows(data, rows[mine] - offset)
    if distributed.world_size() > 1:
        t = torch.from_numpy(out)
        dist.all_reduce(t)
        out = t.numpy()
    return out


def kmeans(
    data: Data,
    k: int,
    niter: int = 20,
    seed: int = 0,
    engine: str = "auto",
    gpu: bool = False,
    batch_size: int = 65536,
) -> KMeansResult:
    """k-means with the best engine: 'faiss' (in-memory faiss.Kmeans), 'lloyd' (streaming/distributed) or
    'auto'
    (lloyd under torch.distributed or for shard lists, faiss otherwise)."""
    if engine == "auto":
        engine = "lloyd" if (distributed.is_enabled() or not isinstance(data, np.ndarray)) else "faiss"
    if engine == "faiss":
        return kmeans_faiss(data if isinstance(data, np.ndarray) else to_array(data), k, niter, seed, gpu)
    if engine == "lloyd":
        return kmeans_lloyd(data, k, niter, seed, batch_size, gpu)
    raise DinoforgeError(f"unknown k-means engine {engine!r} (choose auto, faiss or lloyd)")


def _closest_per_cluster(assign: np.ndarray, sqd: np.ndarray, k: int, m: int) -> np.ndarray:
    """Indices of the m points closest to their centroid in each cluster (all of a smaller cluster)."""
    order = np.lexsort((sqd, assign))
    sorted_assign = assign[order]
    starts = np.searchsorted(sorted_assign, np.arange(k))
    rank_in_cluster = np.arange(len(order)) - starts[sorted_assign]
    return np.sort(order[rank_in_cluster < m])


def _kmeans_split_over_ranks(data: Data, k: int, niter: int, seed: int, gpu: bool) -> KMeansResult:
    """Distributed Lloyd where every rank sees the same data but processes only its contiguous row range;
    the assignments are gathered so every rank returns the full result."""
    rank, world, n = distributed.rank(), distributed.world_size(), num_rows(data)
    bounds = [n * r // world for r in range(world + 1)]
    local = kmeans_lloyd(row_range(data, bounds[rank], bounds[rank + 1]), k, niter, seed, gpu=gpu)
    parts: list = [None] * world
    dist.all_gather_object(parts, (local.assign, local.sqdist))
    assign = np.concatenate([p[0] for p in parts])
    sqd = np.concatenate([p[1] for p in parts])
    return KMeansResult(local.centroids, assign, sqd, local.inertia)


PAPER_LEVELS = (743_000_000, 10_000_000, 500_000, 50_000, 10_000)
"""Vo et al. 2024's web-image curation: 743M images clustered by a 4-level k-means into 10M, 500k, 50k, 10k
clusters, i.e. about 74 images per level-0 cluster, then 20, 10 and 5 children per cluster."""


def auto_levels(n: int) -> tuple[list[int], int]:
    """Clusters per level and Lloyd iterations for n points, in the proportions of PAPER_LEVELS: each level divides
    the one below by the paper's ratio, stopping before a level of fewer than 2 clusters (at least one level).
    Iterations: 20 up to 100k points, 10 beyond (level 0 costs n * k0 * d per iteration, and k0 grows with n)."""
    ratios = [a / b for a, b in zip(PAPER_LEVELS, PAPER_LEVELS[1:], strict=False)]
    levels, k = [], float(n)
    for r in ratios:
        k /= r
        if round(k) < 2:
            break
        levels.append(int(round(k)))
    return levels or [1], 20 if n <= 100_000 else 10


@dataclass
class Hierarchy:
    """Hierarchical k-means: levels[0] clusters the points, levels[l] clusters the centroids of
    levels[l-1]."""

    levels: list[KMeansResult]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every level's centroids, assignments and distances, by name (what `save` writes)."""
        arrays = {}
        for i, lvl in enumerate(self.levels):
            arrays |= {f"centroids_{i}": lvl.centroids, f"assign_{i}": lvl.assign, f"sqdist_{i}": lvl.sqdist}
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Hierarchy:
        """The hierarchy of `arrays()`."""
        n = len([k for k in arrays if k.startswith("centroids_")])
        levels = []
        for i in range(n):
            sqd = arrays[f"sqdist_{i}"]
            levels.append(KMeansResult(arrays[f"centroids_{i}"], arrays[f"assign_{i}"], sqd, float(sqd.sum())))
        return cls(levels)

    def save(self, path: str | Path) -> Path:
        """Store every level in one .npz."""
        np.savez(path, **self.arrays())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Hierarchy:
        """Read a hierarchy written by `save`."""
        with np.load(path) as z:
            return cls.from_arrays({k: z[k] for k in z.files})

    def point_clusters(self) -> np.ndarray:
        """(n, L) cluster id of every point at every level (level 0 first)."""
        cols = [self.levels[0].assign]
        for lvl in self.levels[1:]:
            cols.append(lvl.assign[cols[-1]])
        return np.stack(cols, axis=1)


def hierarchical_kmeans(
    data: Data,
    ks: Sequence[int],
    niter: int = 20,
    resample_steps: int | Sequence[int] = 0,
    sample_sizes: int | Sequence[int] | None = None,
    seed: int = 0,
    engine: str = "auto",
    gpu: bool = False,
) -> Hierarchy:
    """Hierarchical k-means with resampling (Vo et al. 2024): each level clusters the previous level's
    centroids.

    A resampling step re-fits the centroids on the `sample_size` points closest to each centroid
    (starting from the
    current centroids) and re-assigns every point; it moves centroids away from dense regions so clusters
    spread
    evenly over concepts. Under torch.distributed only level 0 is distributed; upper levels are small and
    local.
    """
    ks = list(ks)
    if not ks:
        raise DinoforgeError("hierarchical k-means needs at least one level (ks)")
    steps = [resample_steps] * len(ks) if isinstance(resample_steps, int) else list(resample_steps)
    if sample_sizes is None:
        sizes = [0] * len(ks)
    else:
        sizes = [sample_sizes] * len(ks) if isinstance(sample_sizes, int) else list(sample_sizes)
    if len(steps) != len(ks) or len(sizes) != len(ks):
        raise DinoforgeError("resample_steps and sample_sizes need one value per level")
    levels: list[KMeansResult] = []
    x: Data = data
    for lvl, k in enumerate(track(ks, "hierarchical k-means")):
        if lvl == 0 and distributed.world_size() > 1:
            res = _kmeans_split_over_ranks(x, k, niter, seed, gpu)
        else:
            res = kmeans(x, k, niter, seed + lvl, engine if lvl == 0 else "faiss", gpu)
        if steps[lvl] and sizes[lvl] > 0:
            arr = x if isinstance(x, np.ndarray) else to_array(x)
            for _ in range(steps[lvl]):
                sub = arr[_closest_per_cluster(res.assign, res.sqdist, k, sizes[lvl])]
                fit = kmeans_faiss(sub, k, niter, seed + lvl, gpu, init=res.centroids)
                assign, sqd = assign_to_centroids(arr, fit.centroids, gpu=gpu)
                res = KMeansResult(fit.centroids, assign, sqd, float(sqd.astype(np.float64).sum()))
        levels.append(res)
        x = res.centroids
    return Hierarchy(levels)

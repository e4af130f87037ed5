"""Copy-detection de-duplication: cosine near-duplicate graph (faiss), connected components, one image
kept per
component; and removal of pool images that nearly duplicate an evaluation/test image.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinoforge.curate.kmeans import flat_index, gpu_available
from dinoforge.curate.store import Data, dim, iter_batches, normalize, num_rows, take_rows, to_array
from dinoforge.utils import DinoforgeError

DEFAULT_THRESHOLD = 0.93


def build_index(
    data: Data,
    index_type: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    gpu: bool = False,
    batch_size: int = 65536,
    seed: int = 0,
) -> faiss.Index:
    """Inner-product index over L2-normalised rows, filled batch by batch: 'flat' (exact), 'ivf' or 'ivfpq'
    (approximate, for large pools; trained on a sample)."""
    n, d = num_rows(data), dim(data)
    if index_type == "flat":
        index = flat_index(d, "ip", gpu)
    elif index_type in ("ivf", "ivfpq"):
        nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))
        quantizer = faiss.IndexFlatIP(d)
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if d % m == 0)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(normalize(take_rows(data, rows)))
        index.nprobe = nprobe
        if gpu:
            if not gpu_available():
                raise DinoforgeError("GPU faiss requested but this faiss build has no GPU support or sees no GPU")
            index = faiss.index_cpu_to_all_gpus(index)
    else:
        raise DinoforgeError(f"unknown index type {index_type!r} (choose flat, ivf or ivfpq)")
    for _, xb in iter_batches(data, batch_size):
        index.add(normalize(xb))
    return index


def duplicate_pairs(
    data: Data,
    threshold: float = DEFAULT_THRESHOLD,
    k: int | None = None,
    index_type: str = "flat",
    gpu: bool = False,
    batch_size: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with cosine >= threshold: faiss range search, or a k-NN search when k is given
    (bounded memory, GPU-capable; misses pairs beyond the k-th neighbour). Returns ((m, 2) int64, (m,)
    float32)."""
    if num_rows(data) == 0:
        raise DinoforgeError("de-duplication of an empty pool")
    index = build_index(data, index_type, gpu=gpu)
    src, dst, sims = [], [], []
    for start, xb in iter_batches(data, batch_size):
        q = normalize(xb)
        if k is None:
            lims, dd, ii = index.range_search(q, threshold)
            qi = np.repeat(np.arange(len(q)), np.diff(lims).astype(np.int64)) + start
        else:
            dd, ii = index.search(q, k + 1)
            ok = (ii >= 0) & (dd >= threshold)
            qi = np.broadcast_to(np.arange(len(q))[:, None] + start, ii.shape)[ok]
            dd, ii = dd[ok], ii[ok]
        keep = ii > qi
        src.append(qi[keep])
        dst.append(ii[keep])
        sims.append(dd[keep])
    pairs = np.stack([np.concatenate(src), np.concatenate(dst)], axis=1).astype(np.int64)
    sim = np.concatenate(sims).astype(np.float32)
    if len(pairs):
        pairs, first = np.unique(pairs, axis=0, return_index=True)
        sim = sim[first]
    return pairs, sim


@dataclass
class DedupResult:
    """keep: sorted row indices kept (one per component); component: component id of every row;
    pairs/similarity: the near-duplicate edges found."""

    keep: np.ndarray
    component: np.ndarray
    pairs: np.ndarray
    similarity: np.ndarray

    @property
    def removed(self) -> np.ndarray:
        """Rows dropped as duplicates of a kept row."""
        mask = np.ones(len(self.component), bool)
        mask[self.keep] = False
        return np.nonzero(mask)[0]


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of n nodes given undirected edges (scipy.sparse.csgraph)."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def dedup(
    data: Data,
    threshold: float = DEFAULT_THRESHOLD,
    k: int | None = None,
    index_type: str = "flat",
    gpu: bool = False,
) -> DedupResult:
    """De-duplicate: link rows with cosine >= threshold, keep the first row (lowest index) of each
    component."""
    pairs, sim = duplicate_pairs(data, threshold, k, index_type, gpu)
    comp = components(num_rows(data), pairs)
    _, keep = np.unique(comp, return_index=True)
    return DedupResult(np.sort(keep), comp, pairs, sim)


def near_reference(
    data: Data,
    reference: Data,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 16384,
    gpu: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every row, its most similar reference row: (is near duplicate bool, best cosine, reference index).
    Used to drop pool images that copy an evaluation/test image."""
    if num_rows(reference) == 0:
        raise DinoforgeError("reference (evaluation/test) set is empty")
    index = flat_index(dim(reference), "ip", gpu)
    index.add(normalize(to_array(reference)))
    n = num_rows(data)
    best = np.full(n, -np.inf, np.float32)
    ref = np.full(n, -1, np.int64)
    for start, xb in iter_batches(data, batch_size):
        dd, ii = index.search(normalize(xb), 1)
        best[start : start + len(xb)] = dd[:, 0]
        ref[start : start + len(xb)] = ii[:, 0]
    return best >= threshold, best, ref

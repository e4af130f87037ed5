"""Retrieval of pool images similar to curated sources (DINOv2 §3): sample-based (k nearest pool images
of each
curated image) for large sources, cluster-based (M images from each pool cluster near a curated image)
for small."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinoforge.curate.dedup import build_index
from dinoforge.curate.kmeans import KMeansResult, assign_to_centroids, kmeans
from dinoforge.curate.store import Data, iter_batches, normalize, num_rows, to_array
from dinoforge.utils import DinoforgeError


@dataclass
class Retrieved:
    """Pool rows retrieved for one source, their best cosine to the source, and the method used."""

    rows: np.ndarray
    similarity: np.ndarray
    method: str


def _best_per_row(rows: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((-sims, rows))
    rows, sims = rows[order], sims[order]
    first = np.r_[True, rows[1:] != rows[:-1]]
    return rows[first], sims[first]


def sample_based(pool: Data, curated: Data, k: int = 4, index_type: str = "flat", gpu: bool = False) -> Retrieved:
    """The k nearest pool images (cosine) of every curated image; union, each with its best similarity. The pool's
    index is planned by size like de-duplication's (`index_type`, default exact)."""
    _nonempty(pool, curated)
    index = build_index(pool, index_type, gpu=gpu).index
    rows, sims = [], []
    for _, q in iter_batches(curated, 16384):
        dd, ii = index.search(normalize(q), min(k, num_rows(pool)))
        ok = ii >= 0
        rows.append(ii[ok])
        sims.append(dd[ok])
    r, s = _best_per_row(np.concatenate(rows).astype(np.int64), np.concatenate(sims).astype(np.float32))
    return Retrieved(r, s, "sample")


def cluster_based(
    pool: Data,
    curated: Data,
    clusters: KMeansResult,
    m: int,
    min_similarity: float = -1.0,
    seed: int = 0,
) -> Retrieved:
    """Take up to m random pool images from every pool cluster that is the nearest (the k-means metric, L2) to
    some curated image whose cosine to that centroid is >= min_similarity; that cosine is reported."""
    _nonempty(pool, curated)
    q = to_array(curated)
    assign, _ = assign_to_centroids(q, clusters.centroids)
    cos = (normalize(q) * normalize(clusters.centroids)[assign]).sum(1)
    ok = cos >= min_similarity
    hit_clusters, hit_sims = _best_per_row(assign[ok], cos[ok].astype(np.float32))
    rng = np.random.default_rng(seed)
    rows, sims = [], []
    for c, s in zip(hit_clusters, hit_sims, strict=True):
        members = np.nonzero(clusters.assign == c)[0]
        take = np.sort(rng.choice(members, size=min(m, len(members)), replace=False))
        rows.append(take)
        sims.append(np.full(len(take), s, np.float32))
    if not rows:
        return Retrieved(np.zeros(0, np.int64), np.zeros(0, np.float32), "cluster")
    return Retrieved(np.concatenate(rows), np.concatenate(sims), "cluster")


def retrieve(
    pool: Data,
    sources: dict[str, Data],
    k: int = 4,
    m: int = 100,
    sample_min_size: int = 1_000_000,
    n_clusters: int | None = None,
    pool_clusters: KMeansResult | None = None,
    seed: int = 0,
    gpu: bool = False,
) -> dict[str, Retrieved]:
    """Retrieve for every curated source: sample-based when the source has >= sample_min_size images (enough
    queries to cover its distribution), cluster-based otherwise (a few queries pull whole pool clusters)."""
    if not sources:
        raise DinoforgeError("no curated sources given for retrieval")
    out = {}
    for name, emb in sources.items():
        if num_rows(emb) == 0:
            raise DinoforgeError(f"curated source {name!r} is empty")
        if num_rows(emb) >= sample_min_size:
            out[name] = sample_based(pool, emb, k, gpu=gpu)
        else:
            if pool_clusters is None:
                kk = n_clusters or max(1, int(np.sqrt(num_rows(pool))))
                pool_clusters = kmeans(pool, min(kk, num_rows(pool)), seed=seed, gpu=gpu)
            out[name] = cluster_based(pool, emb, pool_clusters, m, seed=seed)
    return out


def _nonempty(pool: Data, curated: Data) -> None:
    if num_rows(pool) == 0:
        raise DinoforgeError("retrieval from an empty pool")
    if num_rows(curated) == 0:
        raise DinoforgeError("retrieval for an empty curated set")

"""Curation engines on synthetic embeddings: k-means per-iteration time vs raw faiss and vs a plain-torch k-means
(chunked cdist + float64 accumulation, as in ssl-data-curation), duplicate search vs raw faiss, and growth with n.

    python benchmarks/curation.py --n 100000 --n 1000000
Prints one JSON line per measurement; ratios compare peers run in this same process on the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import faiss
import numpy as np
import torch

from dinoforge.curate.dedup import duplicate_pairs
from dinoforge.curate.kmeans import kmeans_faiss, kmeans_lloyd


def synthetic(n: int, d: int, n_modes: int, seed: int) -> np.ndarray:
    """Unit-norm vectors from a long-tailed mixture, with 1% planted near duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_modes, d)).astype(np.float32)
    w = 1.0 / np.arange(1, n_modes + 1)
    lab = rng.choice(n_modes, size=n, p=w / w.sum())
    x = centres[lab]
    x += 0.7 * rng.standard_normal((n, d), dtype=np.float32)
    dup = rng.choice(n, n // 100, replace=False)
    x[dup] = x[(dup + 1) % n] + 0.01 * rng.standard_normal((len(dup), d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def torch_kmeans(x: np.ndarray, init: np.ndarray, niter: int, chunk: int = 16384) -> tuple[np.ndarray, float]:
    """Plain-torch Lloyd: chunked torch.cdist in float64, argmin, index_add_ of sums (ssl-data-curation style)."""
    xt = torch.from_numpy(x)
    c = torch.from_numpy(init).double()
    for _ in range(niter + 1):
        sums = torch.zeros_like(c)
        counts = torch.zeros(len(c), dtype=torch.float64)
        inertia = 0.0
        for s in range(0, len(xt), chunk):
            xc = xt[s : s + chunk].double()
            dist = torch.cdist(xc, c)
            best, a = dist.min(1)
            inertia += float((best**2).sum())
            sums.index_add_(0, a, xc)
            counts.index_add_(0, a, torch.ones(len(a), dtype=torch.float64))
        new = c.clone()
        nz = counts > 0
        new[nz] = sums[nz] / counts[nz, None]
        c = new
    return c.float().numpy(), inertia  # inertia of the centroids after `niter` updates


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def bench_kmeans(x: np.ndarray, k: int, niter: int, seed: int, repeat: int) -> None:
    """All engines start from the same k random rows, so inertias are comparable; raw faiss and ours run
    interleaved, best of `repeat` rounds, so a busy machine slows all of them alike."""
    n, d = x.shape
    init = x[np.sort(np.random.default_rng(seed).choice(n, k, replace=False))]

    def raw_faiss():
        km = faiss.Kmeans(d, k, niter=niter, seed=seed, max_points_per_centroid=n + 1, verbose=False)
        km.train(x, init_centroids=init)
        return float(km.index.search(x, 1)[0].astype(np.float64).sum())

    engines = {
        "raw_faiss": raw_faiss,
        "dinoforge.faiss": lambda: kmeans_faiss(x, k, niter, seed, init=init).inertia,
        "dinoforge.lloyd": lambda: kmeans_lloyd(x, k, niter, seed, init=init).inertia,
    }
    best = dict.fromkeys(engines, float("inf"))
    inertia = {}
    for _ in range(repeat):
        for name, fn in engines.items():
            t = time.perf_counter()
            inertia[name] = fn()
            best[name] = min(best[name], (time.perf_counter() - t) / niter)
    t = time.perf_counter()
    _, torch_inertia = torch_kmeans(x, init, niter)
    torch_s = (time.perf_counter() - t) / (niter + 1)
    for name in ("dinoforge.faiss", "dinoforge.lloyd"):
        emit(
            bench="kmeans",
            engine=name,
            n=n,
            d=d,
            k=k,
            niter=niter,
            s_per_iter=round(best[name], 4),
            raw_faiss_s_per_iter=round(best["raw_faiss"], 4),
            ratio_vs_raw_faiss=round(best[name] / best["raw_faiss"], 3),
            plain_torch_s_per_iter=round(torch_s, 4),
            speedup_vs_plain_torch=round(torch_s / best[name], 2),
            inertia=inertia[name],
            raw_faiss_inertia=inertia["raw_faiss"],
            plain_torch_inertia=torch_inertia,
            inertia_vs_plain_torch=round(inertia[name] / torch_inertia, 5),
            note="s_per_iter = total / niter; every engine includes its final full assignment",
        )


def bench_dups(x: np.ndarray, threshold: float, index_type: str) -> None:
    n, d = x.shape
    t = time.perf_counter()
    pairs, _ = duplicate_pairs(x, threshold, index_type=index_type)
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    if index_type == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x[np.sort(np.random.default_rng(0).choice(n, min(n, 64 * nlist), replace=False))])
        index.nprobe = 16
    index.add(x)
    lims, _, ii = index.range_search(x, threshold)
    raw_pairs = int((ii > np.repeat(np.arange(n), np.diff(lims).astype(np.int64))).sum())
    raw_s = time.perf_counter() - t
    emit(
        bench="duplicate_search",
        index=index_type,
        n=n,
        d=d,
        threshold=threshold,
        s=round(ours_s, 3),
        raw_faiss_s=round(raw_s, 3),
        ratio_vs_raw=round(ours_s / raw_s, 3),
        pairs=len(pairs),
        raw_pairs=raw_pairs,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="pool sizes (repeatable); default 1000000")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=256, help="k-means clusters")
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--dup-n", type=int, default=50000, help="rows for the exact (flat) duplicate search")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="k-means timings: best of this many runs")
    ap.add_argument("--skip", action="append", default=[], choices=["kmeans", "flat", "ivf"])
    args = ap.parse_args()
    emit(
        bench="env",
        threads=torch.get_num_threads(),
        faiss_threads=faiss.omp_get_max_threads(),
        cpus=os.cpu_count(),
        faiss=faiss.__version__,
        torch=torch.__version__,
    )
    for n in args.n or [1_000_000]:
        x = synthetic(n, args.d, 1000, args.seed)
        if "kmeans" not in args.skip:
            bench_kmeans(x, args.k, args.niter, args.seed, args.repeat)
        if "flat" not in args.skip:
            bench_dups(x[: min(n, args.dup_n)], args.threshold, "flat")
        if "ivf" not in args.skip:
            bench_dups(x, args.threshold, "ivf")
        del x


if __name__ == "__main__":
    main()

"""Curation engines at scale, each against a named peer in the same invocation.

- `dedup`: a pool with the structure of real embeddings (`realistic_pool`: long-tailed clusters of clusters, planted
  near copies at crop- and JPEG-like noise, an evaluation set partly copied into the pool), written as float16 shards
  and read memory-mapped. dinoforge's planned duplicate search (`--index auto` unless given) against raw faiss with
  the same index (same lists, probes, training sample; the pool as an fp32 array, a k-NN search of every row), each
  in its own process for an honest peak RSS. Reports time, peak RSS, planted-copy recall and precision, recall
  against exact search on a sample, evaluation copies removed, and (`--balance`) the balance of a balanced sample
  against the pool, measured on the generator's true clusters. `--placeholder N` runs the pool a second time with N
  rows replaced by one vector (a web pool's "image unavailable" image), to compare peak memory.
- `kmeans`: seconds per iteration against raw faiss and a plain-torch k-means (chunked cdist, float64 sums).

    python benchmarks/curation.py --n 1000000 --skip kmeans
    python benchmarks/curation.py --n 1000000 --skip kmeans --skip raw --placeholder 100000
Prints one JSON line per measurement; ratios compare peers run in this same invocation on the same data.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from dinoforge.curate.dedup import DEFAULT_THRESHOLD, components, dedup, measure_recall, near_reference, plan_index
from dinoforge.curate.kmeans import hierarchical_kmeans, kmeans_faiss, kmeans_lloyd
from dinoforge.curate.sample import balanced_sample, size_entropy
from dinoforge.curate.store import take_rows


def synthetic(n: int, d: int, n_modes: int, seed: int) -> np.ndarray:
    """Unit-norm vectors from a long-tailed mixture (the k-means benchmark's data)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_modes, d)).astype(np.float32)
    w = 1.0 / np.arange(1, n_modes + 1)
    lab = rng.choice(n_modes, size=n, p=w / w.sum())
    x = centres[lab]
    x += 0.7 * rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _copies(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Near copies: crop-like (cosine ~0.95-0.97 to the original) or JPEG-like (~0.98-0.995) isotropic noise."""
    d = x.shape[1]
    crop = rng.random(len(x)) < 0.5
    cos = np.where(crop, rng.uniform(0.95, 0.97, len(x)), rng.uniform(0.98, 0.995, len(x)))
    scale = np.sqrt(1 / cos**2 - 1) / np.sqrt(d)  # |noise| / |x| = tan(angle)
    return _unit(x + (scale[:, None] * rng.standard_normal(x.shape)).astype(np.float32))


def realistic_pool(
    n: int, d: int = 384, copy_frac: float = 0.01, eval_n: int = 5000, eval_copied: int = 500, seed: int = 0
) -> dict[str, np.ndarray]:
    """A pool with the structure of real embeddings: ~n/100 clusters under ~n/2000 super-clusters, sizes Zipf
    (1/rank), per-cluster spreads so that non-copies stay below cosine 0.8; `copy_frac * n` planted near copies
    (a third of the copied images get 2-3 copies), and `eval_copied` copies of an evaluation set of `eval_n`
    images. Rows are shuffled. Returns pool (n, d) float32, group (row -> planted group id, -1 for none), label
    (true cluster), eval (eval_n, d), eval_copy (rows that copy an evaluation image)."""
    rng = np.random.default_rng(seed)
    n_super, n_clusters = max(2, n // 2000), max(4, n // 100)
    supers = _unit(rng.standard_normal((n_super, d)).astype(np.float32))
    parent = rng.integers(0, n_super, n_clusters)
    centres = _unit(supers[parent] + 0.06 * rng.standard_normal((n_clusters, d)).astype(np.float32))
    spread = rng.uniform(0.045, 0.07, n_clusters).astype(np.float32)
    w = 1.0 / np.arange(1, n_clusters + 1)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        lab = rng.choice(n_clusters, size=m, p=w / w.sum())
        out = np.empty((m, d), np.float32)
        for s in range(0, m, 262144):
            lb = lab[s : s + 262144]
            out[s : s + len(lb)] = centres[lb] + spread[lb, None] * rng.standard_normal((len(lb), d), np.float32)
        return _unit(out), lab

    n_copies = int(copy_frac * n)
    base, lab = draw(n - n_copies - eval_copied)
    ev, _ = draw(eval_n)
    per_src = rng.choice([1, 1, 1, 1, 2, 3], size=n_copies)  # a third of the sources get 2 or 3 copies
    src = rng.choice(len(base), size=int(np.searchsorted(np.cumsum(per_src), n_copies) + 1), replace=False)
    reps = np.repeat(src, per_src[: len(src)])[:n_copies]
    ecopy = rng.choice(eval_n, eval_copied, replace=False)
    pool = np.concatenate([base, _copies(base[reps], rng), _copies(ev[ecopy], rng)])
    group = np.full(len(pool), -1, np.int64)
    group[src] = src
    group[len(base) : len(base) + n_copies] = reps
    label = np.concatenate([lab, lab[reps], np.full(eval_copied, -1)])
    is_eval_copy = np.zeros(len(pool), bool)
    is_eval_copy[len(base) + n_copies :] = True
    order = rng.permutation(len(pool))
    inverse = np.argsort(order)
    group = np.where(group >= 0, inverse[np.maximum(group, 0)], -1)[order]
    return {"pool": pool[order], "group": group, "label": label[order], "eval": ev, "eval_copy": is_eval_copy[order]}


def write_shards(x: np.ndarray, folder: Path, rows: int = 100_000) -> list[Path]:
    """float16 .npy shards, the format `curate embed` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, s in enumerate(range(0, len(x), rows)):
        paths.append(folder / f"shard_{i:05d}.npy")
        np.save(paths[-1], x[s : s + rows].astype(np.float16))
    return paths


def _peak_rss_gb() -> float:
    """Peak RSS of this process's own address space (VmHWM; ru_maxrss would count the parent's RSS at the fork)."""
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 2**20


def _cpu_s() -> float:
    """This process's CPU time (user + system): less sensitive than wall time to other jobs on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _ours(folder: str, eval_file: str, index: str, threshold: float, recall_queries: int, nprobe, q) -> None:
    """dinoforge in a fresh process: memory-mapped fp16 shards, the planned index, components; then the
    near-evaluation search and the recall of the pairs against exact search on a sample."""
    shards = [np.load(p, mmap_mode="r") for p in sorted(Path(folder).glob("shard_*.npy"))]
    n, d = sum(len(s) for s in shards), shards[0].shape[1]
    plan = plan_index(n, d, index, nprobe=nprobe)
    t, c, load = time.perf_counter(), _cpu_s(), os.getloadavg()[0]
    res = dedup(shards, threshold, plan)
    dedup_s, dedup_cpu = time.perf_counter() - t, _cpu_s() - c
    rss = _peak_rss_gb()
    t = time.perf_counter()
    near = near_reference(shards, np.load(eval_file), threshold)[0]
    near_s = time.perf_counter() - t
    t = time.perf_counter()
    recall = measure_recall(shards, res.pairs, threshold, recall_queries) if plan.index != "flat" else None
    recall_s = time.perf_counter() - t
    q.put(
        {
            "plan": plan.as_dict(),
            "dedup_s": dedup_s,
            "dedup_cpu_s": dedup_cpu,
            "load": [round(load, 2), round(os.getloadavg()[0], 2)],
            "dedup_peak_rss_gb": rss,
            "pairs": res.pairs,
            "keep": res.keep,
            "near_eval": near,
            "near_eval_s": near_s,
            "recall": recall,
            "recall_s": recall_s,
        }
    )


def _raw_faiss(folder: str, plan: dict, threshold: float, q) -> None:
    """The peer: the pool loaded as one fp32 array, IndexIVFFlat (or IndexFlatIP) with the same lists, probes and
    training rows, a k-NN search of every row, pairs at or above the threshold found from either of their rows, as a
    faiss user would write it."""
    x = np.concatenate([np.load(p) for p in sorted(Path(folder).glob("shard_*.npy"))]).astype(np.float32)
    faiss.normalize_L2(x)
    t, c, load = time.perf_counter(), _cpu_s(), os.getloadavg()[0]
    n, d = x.shape
    if plan["index"] == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, plan["nlist"], faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(0).choice(n, size=plan["train_size"], replace=False))
        index.train(x[rows])
        index.nprobe = plan["nprobe"]
    index.add(x)
    src, dst = [], []
    for s in range(0, n, 16384):
        dd, ii = index.search(x[s : s + 16384], plan["k"])
        qi = np.broadcast_to(np.arange(s, s + len(dd))[:, None], ii.shape)
        ok = (dd >= threshold) & (ii >= 0) & (ii != qi)  # from both sides: a pair found by either row
        src.append(np.minimum(qi, ii)[ok])
        dst.append(np.maximum(qi, ii)[ok])
    seconds, cpu = time.perf_counter() - t, _cpu_s() - c
    pairs = np.unique(np.stack([np.concatenate(src), np.concatenate(dst)], 1), axis=0)
    load = [round(load, 2), round(os.getloadavg()[0], 2)]
    q.put({"s": seconds, "cpu_s": cpu, "load": load, "peak_rss_gb": _peak_rss_gb(), "pairs": pairs})


def _in_process(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def planted_scores(pairs: np.ndarray, group: np.ndarray) -> dict:
    """Recall: planted copies whose found component holds their original; precision: found pairs inside one
    planted group (an original and its copies)."""
    comp = components(len(group), pairs)
    copies = np.nonzero((group >= 0) & (group != np.arange(len(group))))[0]
    same = comp[copies] == comp[group[copies]]
    inside = (group[pairs[:, 0]] >= 0) & (group[pairs[:, 0]] == group[pairs[:, 1]]) if len(pairs) else np.zeros(0)
    return {
        "planted_copies": len(copies),
        "recall": round(float(same.mean()), 5),
        "precision": round(float(inside.mean()), 5) if len(pairs) else None,
    }


def add_placeholder(data: dict[str, np.ndarray], rows: int, seed: int) -> None:
    """Replace `rows` pool rows (none of them planted copies or their originals) by one vector: the embedding of an
    "image unavailable" placeholder that web pools hold many times. They form one planted group."""
    free = np.nonzero((data["group"] < 0) & ~data["eval_copy"])[0]
    rng = np.random.default_rng(seed + 1)
    picked = np.sort(rng.choice(free, size=rows, replace=False))
    data["pool"][picked] = _unit(rng.standard_normal((1, data["pool"].shape[1])).astype(np.float32))
    data["group"][picked] = picked[0]


def bench_dedup(args, n: int, placeholder: int = 0) -> None:
    t = time.perf_counter()
    data = realistic_pool(n, args.d, seed=args.seed)
    if placeholder:
        add_placeholder(data, placeholder, args.seed)
    gen_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "pool"
        write_shards(data["pool"], folder)
        np.save(Path(tmp) / "eval.npy", data["eval"].astype(np.float16))
        group, label, eval_copy = data["group"], data["label"], data["eval_copy"]
        del data
        ours = _in_process(
            _ours,
            str(folder),
            str(Path(tmp) / "eval.npy"),
            args.index,
            args.threshold,
            args.recall_queries,
            args.nprobe,
        )
        raw = _in_process(_raw_faiss, str(folder), ours["plan"], args.threshold) if "raw" not in args.skip else None
        balance = _balance(folder, ours["keep"], eval_copy, ours["near_eval"], label, args) if args.balance else None
    emit(
        bench="dedup",
        n=n,
        d=args.d,
        placeholder_rows=placeholder,
        threshold=args.threshold,
        generate_s=round(gen_s, 1),
        index=ours["plan"],
        s=round(ours["dedup_s"], 2),
        peak_rss_gb=round(ours["dedup_peak_rss_gb"], 2),
        raw_faiss_s=None if raw is None else round(raw["s"], 2),
        raw_faiss_peak_rss_gb=None if raw is None else round(raw["peak_rss_gb"], 2),
        ratio_vs_raw_faiss=None if raw is None else round(ours["dedup_s"] / raw["s"], 3),
        cpu_s=round(ours["dedup_cpu_s"], 1),
        raw_faiss_cpu_s=None if raw is None else round(raw["cpu_s"], 1),
        cpu_ratio_vs_raw_faiss=None if raw is None else round(ours["dedup_cpu_s"] / raw["cpu_s"], 3),
        load_1min=ours["load"],
        raw_faiss_load_1min=None if raw is None else raw["load"],
        pairs=len(ours["pairs"]),
        raw_faiss_pairs=None if raw is None else len(raw["pairs"]),
        planted=planted_scores(ours["pairs"], group),
        raw_faiss_planted=None if raw is None else planted_scores(raw["pairs"], group),
        recall_vs_exact_sample=ours["recall"],
        recall_check_s=round(ours["recall_s"], 1),
        eval_copies=int(eval_copy.sum()),
        eval_copies_removed=round(float(ours["near_eval"][eval_copy].mean()), 5),
        pool_rows_flagged_near_eval=int(ours["near_eval"].sum()),
        near_eval_s=round(ours["near_eval_s"], 2),
        balance=balance,
        note="s: copy collapse + index build + duplicate search + components; the peer's: build + search",
    )


def _balance(folder: Path, keep, eval_copy, near_eval, label, args) -> dict:
    """Hierarchical k-means and a balanced sample of the cleaned pool; balance of true clusters, sample vs pool."""
    shards = [np.load(p, mmap_mode="r") for p in sorted(folder.glob("shard_*.npy"))]
    clean = keep[~near_eval[keep]]
    x = take_rows(shards, clean)
    levels = [int(v) for v in args.balance.split(",")]
    t = time.perf_counter()
    h = hierarchical_kmeans(
        x,
        levels,
        niter=args.niter,
        resample_steps=[0] + [3] * (len(levels) - 1),
        sample_sizes=[0] + [2] * (len(levels) - 1),
    )
    kmeans_s = time.perf_counter() - t
    picked = balanced_sample(h, len(clean) // 10)
    true = label[clean]
    return {
        "levels": levels,
        "niter": args.niter,
        "kmeans_s": round(kmeans_s, 1),
        "sampled": len(picked),
        "true_cluster_entropy_pool": round(size_entropy(true[true >= 0]), 4),
        "true_cluster_entropy_sample": round(size_entropy(true[picked][true[picked] >= 0]), 4),
        "largest_true_cluster_share_pool": round(float(np.bincount(true[true >= 0]).max() / (true >= 0).sum()), 5),
        "largest_true_cluster_share_sample": round(
            float(np.bincount(true[picked][true[picked] >= 0]).max() / (true[picked] >= 0).sum()), 5
        ),
        "eval_copies_left": int(eval_copy[clean].sum()),
    }


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="pool sizes (repeatable); default 1000000")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=256, help="k-means benchmark: clusters")
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations (both benchmarks)")
    ap.add_argument("--index", default="auto", help="dedup index (auto, flat, ivf, ivfsq8, ivfpq)")
    ap.add_argument("--nprobe", type=int, default=None, help="dedup: IVF probes (default: the plan's)")
    ap.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    ap.add_argument("--recall-queries", type=int, default=1000, help="dedup: sample checked by exact search")
    ap.add_argument(
        "--placeholder", type=int, default=0, help="dedup: also run the pool with this many copies of one vector"
    )
    ap.add_argument("--balance", default=None, help="dedup: also cluster (levels, e.g. 1000,50) and sample")
    ap.add_argument("--tmp", default=None, help="folder for the pool's shards (default: the system's temp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="k-means timings: best of this many runs")
    ap.add_argument(
        "--skip", action="append", default=[], choices=["kmeans", "dedup", "raw", "plain"],
        help="plain: with --placeholder, only the pool that holds the placeholder",
    )  # fmt: skip
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
        if "dedup" not in args.skip:
            for placeholder in sorted({0, args.placeholder} - ({0} if "plain" in args.skip else set())):
                bench_dedup(args, n, placeholder)
        if "kmeans" not in args.skip:
            x = synthetic(n, args.d, 1000, args.seed)
            bench_kmeans(x, args.k, args.niter, args.seed, args.repeat)
            del x


if __name__ == "__main__":
    main()

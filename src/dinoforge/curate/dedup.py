"""Copy-detection de-duplication: cosine near-duplicate graph (faiss), connected components, one image kept per
component; and removal of pool images that nearly duplicate an evaluation/test image.

The index and its parameters follow the pool size and the memory (`plan_index`): exact search for small pools, an
inverted file (IVF) with few probes for large ones, stored as fp32, 8-bit scalar-quantised or product-quantised
vectors, whichever is the most precise that fits. Shards are read memory-mapped, one batch at a time, so the pool
is never held as a second fp32 array beside the index. Under torchrun every rank holds the whole index and searches
its own share of the queries; the pairs are merged, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dinoforge import distributed
from dinoforge.curate.kmeans import flat_index, gpu_available
from dinoforge.curate.store import Data, dim, iter_batches, normalize, num_rows, row_range, take_rows
from dinoforge.utils import DinoforgeError, track

DEFAULT_THRESHOLD = 0.93
INDEX_TYPES = ("auto", "flat", "ivf", "ivfsq8", "ivfpq")
FLAT_MAX_ROWS = 50_000
"""`auto` searches exactly up to this pool size: an exact all-pairs search costs n² d, an IVF one about n^1.5 d."""
_BYTES_PER_DIM = {"flat": 4.0, "ivf": 2.0, "ivfsq8": 1.0}
_TRAIN_PER_LIST = 39
"""Training vectors per inverted list: faiss's own lower bound for a well-fitted coarse quantizer."""


@dataclass(frozen=True)
class IndexPlan:
    """How a pool of `rows` vectors is searched: the index, its IVF lists and probes, the training sample, the
    neighbours asked per query (queries whose k-th neighbour is still a duplicate are completed by a range search),
    the threshold margin of lossy storage (candidates are re-scored exactly), and the index's memory."""

    index: str
    rows: int
    nlist: int
    nprobe: int
    train_size: int
    k: int
    margin: float
    index_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)


def memory_budget() -> int:
    """Bytes an index may take: half the machine's physical memory (the rest is for shards' pages and the graph)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _pq_m(d: int) -> int:
    """PQ sub-quantizers: the most (up to 64, one byte each) that divide d into pieces of at least 4 dimensions."""
    return next((m for m in (64, 48, 32, 16, 8, 4, 2) if d % m == 0 and d // m >= 4), 1)


def _index_bytes(index: str, n: int, d: int) -> int:
    per_vector = _pq_m(d) if index == "ivfpq" else _BYTES_PER_DIM[index] * d
    ids = {"flat": 0, "ivf": 40}.get(index, 8)  # the IVF join: list probes, positions and their sort
    return int(n * (per_vector + ids))


def plan_index(
    n: int,
    d: int,
    index: str = "auto",
    memory_bytes: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    k: int = 8,
) -> IndexPlan:
    """The search plan for n vectors of dimension d. `auto`: exact (flat) up to FLAT_MAX_ROWS rows, else IVF stored
    as a float16 join store (`ivf`), SQ8 or PQ lists, the first that fits in `memory_bytes` (default:
    `memory_budget()`). Probes: 4 (near copies fall in the list of their original or a neighbouring one). Lists: the
    power of two nearest 2 sqrt(n) for the join, whose two matrix products (assignment n L d, join 4 n (n / L) d)
    cost least at L = sqrt(4 n); 4 sqrt(n) for faiss's list scans, slower per operation than a matrix product. At
    least 39 rows per list, which is also the training sample: 39 random rows per list."""
    if index not in INDEX_TYPES:
        raise DinoforgeError(f"unknown index type {index!r} (choose {', '.join(INDEX_TYPES)})")
    if n < 1:
        raise DinoforgeError("de-duplication of an empty pool")
    budget = memory_budget() if memory_bytes is None else memory_bytes
    if index == "auto":
        if n <= FLAT_MAX_ROWS:
            index = "flat"
        else:
            index = next((t for t in ("ivf", "ivfsq8") if _index_bytes(t, n, d) <= budget), "ivfpq")
    if index == "flat":
        return IndexPlan("flat", n, 0, 0, 0, k, 0.0, _index_bytes("flat", n, d))
    per_root = 2 if index == "ivf" else 4
    lists = nlist or int(2 ** round(np.log2(max(per_root * np.sqrt(n), 1))))
    lists = max(1, min(lists, n // _TRAIN_PER_LIST or 1))
    probes = max(1, min(nprobe or 4, lists))
    margin = {"ivf": 0.002, "ivfsq8": 0.01, "ivfpq": 0.05}[index]  # float16 store / SQ8 / PQ scores, re-scored
    train = _TRAIN_PER_LIST * max(lists, 256 if index == "ivfpq" else 1)  # PQ: 256 centroids per sub-quantizer
    return IndexPlan(index, n, lists, probes, min(n, train), k, margin, _index_bytes(index, n, d) + lists * d * 4)


def _train(data: Data, plan: IndexPlan, seed: int) -> faiss.Index:
    """An empty trained index (rank 0 trains on a bounded random sample; the other ranks receive its bytes)."""
    d = dim(data)
    if plan.index == "flat":
        return faiss.IndexFlatIP(d)
    blob = None
    if distributed.rank() == 0:
        quantizer = faiss.IndexFlatIP(d)
        if plan.index == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        elif plan.index == "ivfsq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, d, plan.nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, _pq_m(d), 8, faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(seed).choice(plan.rows, size=plan.train_size, replace=False))
        index.train(normalize(take_rows(data, rows)))
        blob = faiss.serialize_index(index)
    if distributed.world_size() > 1:
        blob = distributed.broadcast_object(blob)
    index = faiss.deserialize_index(blob)
    index.nprobe = plan.nprobe
    return index


@dataclass
class SearchIndex:
    """A filled index and, for IVF, every row's `nprobe` nearest lists (ids, scores): computed once while adding
    and reused when the same rows are the queries, which halves the coarse-quantizer work of an all-pairs search."""

    index: faiss.Index
    plan: IndexPlan
    probe_ids: np.ndarray | None = None
    probe_scores: np.ndarray | None = None


def build_index(
    data: Data,
    plan: IndexPlan | str = "auto",
    gpu: bool = False,
    batch_size: int = 65536,
    seed: int = 0,
    keep_probes: bool = False,
) -> SearchIndex:
    """Inner-product index over the L2-normalised rows, trained on a sample and filled batch by batch from the
    (memory-mapped) data."""
    n = num_rows(data)
    if not isinstance(plan, IndexPlan):
        plan = plan_index(n, dim(data), plan)
    index = _train(data, plan, seed)
    if gpu:
        if not gpu_available():
            raise DinoforgeError("GPU faiss requested but this faiss build has no GPU support or sees no GPU")
        index = faiss.index_cpu_to_all_gpus(index)
    ivf = plan.index != "flat" and not gpu
    probe_ids = np.empty((n, plan.nprobe), np.int64) if ivf and keep_probes else None
    probe_scores = np.empty((n, plan.nprobe), np.float32) if ivf and keep_probes else None
    for start, xb in track(iter_batches(data, batch_size), "index pool", total=-(-n // batch_size)):
        xb = normalize(xb)
        if not ivf:
            index.add(xb)
            continue
        dq, iq = index.quantizer.search(xb, plan.nprobe)
        if keep_probes:
            probe_ids[start : start + len(xb)] = iq
            probe_scores[start : start + len(xb)] = dq
        lists = np.ascontiguousarray(iq[:, 0])  # named: swig_ptr does not keep its array alive
        index.add_core(len(xb), faiss.swig_ptr(xb), None, faiss.swig_ptr(lists))
    return SearchIndex(index, plan, probe_ids, probe_scores)


def _search_batch(si: SearchIndex, q: np.ndarray, start: int, threshold: float) -> tuple[np.ndarray, ...]:
    """(query row, neighbour row, score) of every neighbour at or above threshold of queries q (global rows from
    start): a k-NN search, completed by a range search for the queries whose k-th neighbour still passes."""
    index, plan = si.index, si.plan
    k = min(plan.k, index.ntotal)
    if si.probe_ids is not None:
        rows = slice(start, start + len(q))
        dd, ii = index.search_preassigned(q, k, si.probe_ids[rows], si.probe_scores[rows])
    else:
        dd, ii = index.search(q, k)
    ok = (ii >= 0) & (dd >= threshold)
    full = ok[:, -1].copy() if k < index.ntotal else np.zeros(len(q), bool)
    ok[full] = False
    qi = np.broadcast_to(np.arange(len(q))[:, None], ii.shape)[ok]
    out_q, out_i, out_d = [qi], [ii[ok]], [dd[ok]]
    if full.any():
        sel = np.nonzero(full)[0]
        lims, rd, ri = index.range_search(np.ascontiguousarray(q[sel]), threshold)
        out_q.append(np.repeat(sel, np.diff(lims).astype(np.int64)))
        out_i.append(ri)
        out_d.append(rd)
    return np.concatenate(out_q) + start, np.concatenate(out_i), np.concatenate(out_d)


def _my_rows(n: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n query rows."""
    rank, world = distributed.rank(), distributed.world_size()
    return n * rank // world, n * (rank + 1) // world


def _rescore(data: Data, pairs: np.ndarray) -> np.ndarray:
    """Exact cosine of each pair, read from the data (for lossy index storage)."""
    out = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), 65536):
        p = pairs[s : s + 65536]
        out[s : s + len(p)] = (normalize(take_rows(data, p[:, 0])) * normalize(take_rows(data, p[:, 1]))).sum(1)
    return out


def _join_pairs(data: Data, plan: IndexPlan, threshold: float, seed: int, batch_size: int) -> np.ndarray:
    """Candidate pairs of an IVF self-join: every row goes to its nearest list (a float16 copy of the normalised
    pool, sorted by list) and probes its `nprobe` nearest lists; per list, one matrix product of the rows probing it
    against the rows in it, thresholded. The same pairs as faiss's IVF range search with these lists and probes, at
    matrix-product speed instead of one scan per query. Under torchrun each rank assigns its share of the rows and
    joins its share of the lists; every rank holds the whole store."""
    n, d = num_rows(data), dim(data)
    ivf = _train(data, plan, seed)  # holds the quantizer (the lists' centroids) alive
    lo, hi = _my_rows(n)
    probes = np.empty((hi - lo, plan.nprobe), np.int32)
    batches = iter_batches(row_range(data, lo, hi), batch_size)
    for start, xb in track(batches, "assign to lists", total=-(-(hi - lo) // batch_size)):
        probes[start : start + len(xb)] = ivf.quantizer.search(normalize(xb), plan.nprobe)[1]
    del ivf
    if distributed.world_size() > 1:
        probes = np.concatenate(distributed.gather_objects(probes))
    order = np.argsort(probes[:, 0], kind="stable")  # store position -> row
    where = np.empty(n, np.int64)
    where[order] = np.arange(n)  # row -> store position
    store = np.empty((n, d), np.float16)
    for start, xb in iter_batches(data, batch_size):
        store[where[start : start + len(xb)]] = normalize(xb)
    bounds = np.searchsorted(probes[order, 0], np.arange(plan.nlist + 1))
    by_probe = np.argsort(probes.ravel(), kind="stable")  # (row, probe) entries grouped by probed list
    probe_bounds = np.searchsorted(probes.ravel()[by_probe], np.arange(plan.nlist + 1))
    del probes
    rank, world = distributed.rank(), distributed.world_size()
    mine = range(plan.nlist * rank // world, plan.nlist * (rank + 1) // world)
    found = []
    for c in track(mine, "duplicate search (IVF join)", total=len(mine)):
        lo, hi = bounds[c], bounds[c + 1]
        if lo == hi:
            continue
        members = store[lo:hi].astype(np.float32)
        queries = by_probe[probe_bounds[c] : probe_bounds[c + 1]] // plan.nprobe
        for q0 in range(0, len(queries), 4096):
            rows = queries[q0 : q0 + 4096]
            a, b = np.nonzero(store[where[rows]].astype(np.float32) @ members.T >= threshold)
            pair = np.stack([rows[a], order[lo + b]], 1)
            found.append(pair[pair[:, 0] < pair[:, 1]])
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def duplicate_pairs(
    data: Data,
    threshold: float = DEFAULT_THRESHOLD,
    plan: IndexPlan | str = "auto",
    gpu: bool = False,
    batch_size: int = 16384,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) with cosine >= threshold that the planned index finds (all of them for `flat`).
    Returns ((m, 2) int64 sorted, (m,) float32). Under torchrun each rank searches its share of the rows."""
    n = num_rows(data)
    if n == 0:
        raise DinoforgeError("de-duplication of an empty pool")
    if not isinstance(plan, IndexPlan):
        plan = plan_index(n, dim(data), plan)
    search_at = threshold - plan.margin
    if plan.index == "ivf" and not gpu:
        pairs = _join_pairs(data, plan, search_at, seed, batch_size)
    else:
        si = build_index(data, plan, gpu, seed=seed, keep_probes=True)
        lo, hi = _my_rows(n)
        found = [np.zeros((0, 2), np.int64)]
        batches = iter_batches(row_range(data, lo, hi), batch_size)
        for start, xb in track(batches, "duplicate search", total=-(-(hi - lo) // batch_size)):
            qi, ii, _ = _search_batch(si, normalize(xb), lo + start, search_at)
            found.append(np.stack([qi, ii], 1)[ii > qi])
        del si
        pairs = np.concatenate(found)
    if distributed.world_size() > 1:
        pairs = np.concatenate(distributed.gather_objects(pairs))
    pairs = np.unique(pairs.astype(np.int64).reshape(-1, 2), axis=0)
    sim = _rescore(data, pairs)  # exact cosines (the search may use lossy storage and a margin below threshold)
    return pairs[sim >= threshold], sim[sim >= threshold]


def measure_recall(
    data: Data,
    pairs: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    queries: int = 1000,
    seed: int = 0,
    batch_size: int = 16384,
) -> dict:
    """Recall and precision of found pairs against an exact search for a random sample of query rows: every pair
    with cosine >= threshold that involves a sampled row, from a brute-force pass over the data."""
    n = num_rows(data)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))
    q = normalize(take_rows(data, rows))
    exact = set()
    for start, xb in iter_batches(data, batch_size):
        s = q @ normalize(xb).T
        a, b = np.nonzero(s >= threshold)
        b = b + start
        keep = rows[a] != b
        exact |= {(min(i, j), max(i, j)) for i, j in zip(rows[a[keep]].tolist(), b[keep].tolist(), strict=True)}
    in_sample = np.isin(pairs[:, 0], rows) | np.isin(pairs[:, 1], rows) if len(pairs) else np.zeros(0, bool)
    found = {tuple(p) for p in pairs[in_sample].tolist()}
    hit = len(found & exact)
    return {
        "queries": len(rows),
        "exact_pairs": len(exact),
        "found_pairs": len(found),
        "recall": hit / len(exact) if exact else None,
        "precision": hit / len(found) if found else None,
    }


@dataclass
class DedupResult:
    """keep: sorted row indices kept (one per component); component: component id of every row;
    pairs/similarity: the near-duplicate edges found; plan: the index used."""

    keep: np.ndarray
    component: np.ndarray
    pairs: np.ndarray
    similarity: np.ndarray
    plan: IndexPlan | None = None

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
    plan: IndexPlan | str = "auto",
    gpu: bool = False,
    seed: int = 0,
) -> DedupResult:
    """De-duplicate: link rows with cosine >= threshold, keep the first row (lowest index) of each component."""
    n = num_rows(data)
    if n == 0:
        raise DinoforgeError("de-duplication of an empty pool")
    if not isinstance(plan, IndexPlan):
        plan = plan_index(n, dim(data), plan)
    pairs, sim = duplicate_pairs(data, threshold, plan, gpu, seed=seed)
    comp = components(n, pairs)
    _, keep = np.unique(comp, return_index=True)
    return DedupResult(np.sort(keep), comp, pairs, sim, plan)


def near_reference(
    data: Data,
    reference: Data,
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int = 16384,
    gpu: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every row, its most similar reference row: (is near duplicate bool, best cosine, reference index).
    Used to drop pool images that copy an evaluation/test image. Exact; under torchrun each rank searches its share
    of the rows and every rank returns all of them."""
    if num_rows(reference) == 0:
        raise DinoforgeError("reference (evaluation/test) set is empty")
    index = flat_index(dim(reference), "ip", gpu)
    for _, xb in iter_batches(reference, batch_size):
        index.add(normalize(xb))
    n = num_rows(data)
    lo, hi = _my_rows(n)
    best = np.full(hi - lo, -np.inf, np.float32)
    ref = np.full(hi - lo, -1, np.int64)
    batches = iter_batches(row_range(data, lo, hi), batch_size)
    for start, xb in track(batches, "near-reference search", total=-(-(hi - lo) // batch_size)):
        dd, ii = index.search(normalize(xb), 1)
        best[start : start + len(xb)] = dd[:, 0]
        ref[start : start + len(xb)] = ii[:, 0]
    if distributed.world_size() > 1:
        parts = distributed.gather_objects((best, ref))
        best = np.concatenate([b for b, _ in parts])
        ref = np.concatenate([r for _, r in parts])
    return best >= threshold, best, ref

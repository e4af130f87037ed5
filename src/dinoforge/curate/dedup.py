"""Copy-detection de-duplication: cosine near-duplicate pairs (an IVF self-join or faiss), grown into components
by union-find, one image kept per component; and removal of pool images that nearly duplicate an evaluation/test image.

Bit-identical vectors (a placeholder image repeated a hundred thousand times) are collapsed first, and the pairs are
folded into a union-find as they are found, keeping only the pairs that join two components (a spanning forest), so
memory grows with the rows and not with the square of a duplicate cluster. A pair is kept whichever of its two rows
probes the other's list: the result is that of a symmetric IVF range search over the same lists and probes.

The index and its parameters follow the pool size and the memory of this process (`plan_index`): exact search for
small pools, an inverted file (IVF) with few probes for large ones, stored as float16, 8-bit scalar-quantised or
product-quantised vectors, whichever is the most precise that fits. Shards are read memory-mapped, one batch at a
time. Under torchrun every rank holds the whole index and searches its own share of the queries; the forests are
merged, so the kept rows do not depend on the number of ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import faiss
import numpy as np

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
_ROW_BYTES = 32
"""Per row, in every plan: the row hashes and copy representatives (collapse) and the union-find parents."""
_BLOCK = 1 << 24
"""Scores computed at once in the join (64 MB of float32), whatever the size of a list."""


@dataclass(frozen=True)
class IndexPlan:
    """How a pool of `rows` vectors is searched: the index, its IVF lists and probes, the training sample, the
    neighbours asked per query (queries whose k-th neighbour is still a duplicate are completed by a range search),
    the threshold margin of lossy storage (candidates are re-scored exactly), and the memory of one process."""

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
    """Bytes one process may take: half the machine's physical memory (the rest is for shards' pages), shared by
    the processes torchrun started on this node, since each holds its own index."""
    node = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    return node // distributed.local_world_size()


def _pq_m(d: int) -> int:
    """PQ sub-quantizers: the most (up to 64, one byte each) that divide d into pieces of at least 4 dimensions."""
    return next((m for m in (64, 48, 32, 16, 8, 4, 2) if d % m == 0 and d // m >= 4), 1)


def _index_bytes(index: str, n: int, d: int, nprobe: int = 4) -> int:
    """Peak bytes of one process: the stored vectors, the ids and probes kept per row, and `_ROW_BYTES`."""
    per_vector = _pq_m(d) if index == "ivfpq" else _BYTES_PER_DIM[index] * d
    # the join: list probes (int32), their sort (int64) and the row <-> position maps; faiss: ids + kept probes
    ids = {"flat": 0, "ivf": 12 * nprobe + 16}.get(index, 8 + 12 * nprobe)
    return int(n * (per_vector + ids + _ROW_BYTES))


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
    budget = memory_budget() if memory_bytes is None else memory_bytes
    probes = nprobe or 4
    if index == "auto":
        if n <= FLAT_MAX_ROWS:
            index = "flat"
        else:
            index = next((t for t in ("ivf", "ivfsq8") if _index_bytes(t, n, d, probes) <= budget), "ivfpq")
    if index == "flat":
        return IndexPlan("flat", n, 0, 0, 0, k, 0.0, _index_bytes("flat", n, d))
    per_root = 2 if index == "ivf" else 4
    lists = nlist or int(2 ** round(np.log2(max(per_root * np.sqrt(n), 1))))
    lists = max(1, min(lists, n // _TRAIN_PER_LIST or 1))
    probes = max(1, min(probes, lists))
    margin = {"ivf": 0.002, "ivfsq8": 0.01, "ivfpq": 0.05}[index]  # float16 store / SQ8 / PQ scores, re-scored
    train = _TRAIN_PER_LIST * max(lists, 256 if index == "ivfpq" else 1)  # PQ: 256 centroids per sub-quantizer
    index_bytes = _index_bytes(index, n, d, probes) + lists * d * 4
    return IndexPlan(index, n, lists, probes, min(n, train), k, margin, index_bytes)


def _for_rows(plan: IndexPlan, rows: int) -> IndexPlan:
    """The plan narrowed to the `rows` distinct vectors left after collapsing copies: exact search when too few
    remain to train its lists."""
    if plan.index == "flat" or rows >= plan.nlist * _TRAIN_PER_LIST:
        return plan
    if rows <= FLAT_MAX_ROWS:
        return replace(plan, index="flat", nlist=0, nprobe=0, train_size=0, margin=0.0)
    return replace(plan, nlist=rows // _TRAIN_PER_LIST, train_size=min(plan.train_size, rows))


def _require_plan(data: Data, plan: IndexPlan | str) -> IndexPlan:
    """The plan of a search over `data` (a plan, or an index type planned here); an empty pool is an error."""
    n = num_rows(data)
    if n == 0:
        raise DinoforgeError("de-duplication of an empty pool")
    return plan if isinstance(plan, IndexPlan) else plan_index(n, dim(data), plan)


def _batches(data: Data, ids: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start position in `ids`, float32 rows) over the rows `ids` of the data, one batch at a time."""
    if len(ids) == num_rows(data) and (len(ids) == 0 or ids[-1] == len(ids) - 1):
        yield from iter_batches(data, batch_size)  # every row: contiguous reads
        return
    for s in range(0, len(ids), batch_size):
        yield s, take_rows(data, ids[s : s + batch_size])


def _share(n: int) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n items."""
    rank, world = distributed.rank(), distributed.world_size()
    return n * rank // world, n * (rank + 1) // world


def _train(data: Data, plan: IndexPlan, seed: int, ids: np.ndarray) -> faiss.Index:
    """An empty trained index (rank 0 trains on a bounded random sample of the rows `ids`; the other ranks receive
    its bytes)."""
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
        size = min(plan.train_size, len(ids))
        rows = ids[np.sort(np.random.default_rng(seed).choice(len(ids), size=size, replace=False))]
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
    and reused when the same rows are the queries, which halves the coarse-quantizer work of an all-pairs search.
    Its labels are positions in the rows it was built from."""

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
    ids: np.ndarray | None = None,
) -> SearchIndex:
    """Inner-product index over the L2-normalised rows `ids` (default: all), trained on a sample and filled batch by
    batch from the (memory-mapped) data."""
    plan = _require_plan(data, plan)
    ids = np.arange(num_rows(data)) if ids is None else ids
    index = _train(data, plan, seed, ids)
    if gpu:
        if not gpu_available():
            raise DinoforgeError("GPU faiss requested but this faiss build has no GPU support or sees no GPU")
        index = faiss.index_cpu_to_all_gpus(index)
    ivf = plan.index != "flat" and not gpu
    probe_ids = np.empty((len(ids), plan.nprobe), np.int64) if ivf and keep_probes else None
    probe_scores = np.empty((len(ids), plan.nprobe), np.float32) if ivf and keep_probes else None
    for start, xb in track(_batches(data, ids, batch_size), "index pool", total=-(-len(ids) // batch_size)):
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
    """(query position, neighbour position, score) of every neighbour at or above threshold of queries q (positions
    from start): a k-NN search, completed by a range search for the queries whose k-th neighbour still passes."""
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


def _faiss_blocks(
    data: Data, plan: IndexPlan, threshold: float, gpu: bool, seed: int, batch_size: int, ids: np.ndarray
) -> Iterator[tuple[np.ndarray, ...]]:
    """(query, neighbour, score) positions of a faiss search of this rank's share of the rows, batch by batch."""
    si = build_index(data, plan, gpu, seed=seed, keep_probes=True, ids=ids)
    lo, hi = _share(len(ids))
    for start, xb in track(
        _batches(data, ids[lo:hi], batch_size), "duplicate search", total=-(-(hi - lo) // batch_size)
    ):
        yield _search_batch(si, normalize(xb), lo + start, threshold)


def _join_blocks(
    data: Data, plan: IndexPlan, threshold: float, seed: int, batch_size: int, ids: np.ndarray
) -> Iterator[tuple[np.ndarray, ...]]:
    """(query, member, score) positions of an IVF self-join: every row goes to its nearest list (a float16 copy of the
    normalised rows, sorted by list) and probes its `nprobe` nearest lists; per list, matrix products of the rows
    probing it against the rows in it, thresholded, at most `_BLOCK` scores at a time. Every row is a query, so a
    pair is found from whichever side probes the other's list: the pairs of a symmetric faiss IVF range search with
    these lists and probes, at matrix-product speed. Under torchrun each rank assigns its share of the rows and joins
    its share of the lists; every rank holds the whole store."""
    n, d = len(ids), dim(data)
    ivf = _train(data, plan, seed, ids)  # holds the quantizer (the lists' centroids) alive
    lo, hi = _share(n)
    probes = np.empty((hi - lo, plan.nprobe), np.int32)
    batches = _batches(data, ids[lo:hi], batch_size)
    for start, xb in track(batches, "assign to lists", total=-(-(hi - lo) // batch_size)):
        probes[start : start + len(xb)] = ivf.quantizer.search(normalize(xb), plan.nprobe)[1]
    del ivf
    if distributed.world_size() > 1:
        probes = np.concatenate(distributed.gather_objects(probes))
    order = np.argsort(probes[:, 0], kind="stable")  # store position -> row position
    where = np.empty(n, np.int64)
    where[order] = np.arange(n)  # row position -> store position
    store = np.empty((n, d), np.float16)
    for start, xb in _batches(data, ids, batch_size):
        store[where[start : start + len(xb)]] = normalize(xb)
    bounds = np.searchsorted(probes[order, 0], np.arange(plan.nlist + 1))
    by_probe = np.argsort(probes.ravel(), kind="stable")  # (row, probe) entries grouped by probed list
    probe_bounds = np.searchsorted(probes.ravel()[by_probe], np.arange(plan.nlist + 1))
    del probes
    rank, world = distributed.rank(), distributed.world_size()
    mine = range(plan.nlist * rank // world, plan.nlist * (rank + 1) // world)
    for c in track(mine, "duplicate search (IVF join)", total=len(mine)):
        lo, hi = bounds[c], bounds[c + 1]
        if lo == hi:
            continue
        members = store[lo:hi].astype(np.float32)
        queries = by_probe[probe_bounds[c] : probe_bounds[c + 1]] // plan.nprobe
        step = max(1, min(4096, _BLOCK // (hi - lo)))
        for q0 in range(0, len(queries), step):
            rows = queries[q0 : q0 + step]
            score = store[where[rows]].astype(np.float32) @ members.T
            a, b = np.nonzero(score >= threshold)
            yield rows[a], order[lo + b], score[a, b]


def _candidates(
    data: Data, plan: IndexPlan, threshold: float, gpu: bool, seed: int, batch_size: int, ids: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Candidate pairs (lower row, higher row) with their index scores (>= threshold - margin), block by block,
    found from either of their rows."""
    at = threshold - plan.margin
    if plan.index == "ivf" and not gpu:
        blocks = _join_blocks(data, plan, at, seed, batch_size, ids)
    else:
        blocks = _faiss_blocks(data, plan, at, gpu, seed, batch_size, ids)
    for q, i, score in blocks:
        other = q != i
        q, i = ids[q[other]], ids[i[other]]
        yield np.stack([np.minimum(q, i), np.maximum(q, i)], 1), score[other]


def _rescore(data: Data, pairs: np.ndarray) -> np.ndarray:
    """Exact cosine of each pair, read from the data (for lossy index storage)."""
    out = np.empty(len(pairs), np.float32)
    for s in range(0, len(pairs), 65536):
        p = pairs[s : s + 65536]
        out[s : s + len(p)] = (normalize(take_rows(data, p[:, 0])) * normalize(take_rows(data, p[:, 1]))).sum(1)
    return out


def _confirm(data: Data, plan: IndexPlan, pairs: np.ndarray, score: np.ndarray, threshold: float):
    """The candidates at or above threshold: exact and float16 join scores clear of their error bound (the margin)
    are kept as they are, the others (and every SQ8/PQ score) re-scored exactly from the data."""
    sure = score >= threshold + plan.margin if plan.index in ("flat", "ivf") else np.zeros(len(score), bool)
    doubt = np.nonzero(~sure)[0]
    score = score.astype(np.float32)
    score[doubt] = _rescore(data, pairs[doubt])
    ok = score >= threshold
    return pairs[ok], score[ok]


def duplicate_pairs(
    data: Data,
    threshold: float = DEFAULT_THRESHOLD,
    plan: IndexPlan | str = "auto",
    gpu: bool = False,
    batch_size: int = 16384,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i < j) with cosine >= threshold that the planned index finds (all of them for `flat`), with its
    exact cosine: ((m, 2) int64 sorted, (m,) float32). Memory grows with the pairs: `dedup` is the bounded path."""
    plan = _require_plan(data, plan)
    ids = np.arange(num_rows(data))
    found = [np.zeros((0, 2), np.int64)]
    for pairs, _ in _candidates(data, plan, threshold, gpu, seed, batch_size, ids):
        found.append(pairs)
    pairs = np.concatenate(found)
    if distributed.world_size() > 1:
        pairs = np.concatenate(distributed.gather_objects(pairs))
    pairs = np.unique(pairs.astype(np.int64), axis=0)
    sim = _rescore(data, pairs)
    return pairs[sim >= threshold], sim[sim >= threshold]


class Forest:
    """Union-find over n rows that keeps only the pairs joining two components (a spanning forest of the duplicate
    graph): memory grows with the rows, not with the pairs. Each component's root is its lowest row."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self._pairs: list[np.ndarray] = [np.zeros((0, 2), np.int64)]
        self._sims: list[np.ndarray] = [np.zeros(0, np.float32)]

    def roots(self, rows: np.ndarray) -> np.ndarray:
        """The root (lowest row) of each row's component."""
        r = self.parent[rows]
        while True:
            up = self.parent[r]
            if np.array_equal(up, r):
                return r
            r = up

    def add(self, pairs: np.ndarray, sims: np.ndarray) -> None:
        """Link the pairs, in rounds: each current root is hooked under the lowest root it pairs with, by one pair."""
        ends = pairs.ravel()
        while len(pairs):
            ra, rb = self.roots(pairs[:, 0]), self.roots(pairs[:, 1])
            apart = ra != rb
            pairs, sims, ra, rb = pairs[apart], sims[apart], ra[apart], rb[apart]
            if not len(pairs):
                break
            hi, lo = np.maximum(ra, rb), np.minimum(ra, rb)
            order = np.lexsort((lo, hi))
            first = order[np.r_[True, hi[order][1:] != hi[order][:-1]]]
            self.parent[hi[first]] = lo[first]
            self._pairs.append(pairs[first])
            self._sims.append(sims[first].astype(np.float32))
        self.parent[ends] = self.roots(ends)  # path compression of the rows touched

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """The pairs kept (one per merge, at most n - 1) and their similarities."""
        return np.concatenate(self._pairs), np.concatenate(self._sims)

    def labels(self) -> np.ndarray:
        """Every row's component, named by its lowest row."""
        return self.roots(np.arange(len(self.parent)))


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component of each of n rows given undirected pairs, named by its lowest row."""
    forest = Forest(n)
    forest.add(np.asarray(pairs, np.int64).reshape(-1, 2), np.ones(len(pairs), np.float32))
    return forest.labels()


def exact_copies(data: Data, batch_size: int = 16384) -> np.ndarray:
    """For every row, the lowest row holding the same nonzero vector bit for bit (itself when none). Copies are
    linked without a search, so a placeholder vector repeated 100k times costs one search row, not 10^10 pairs."""
    n, d = num_rows(data), dim(data)
    mult = np.random.default_rng(0).integers(1, 2**62, size=d, dtype=np.uint64) | np.uint64(1)
    code = np.empty(n, np.uint64)
    zero = np.zeros(n, bool)
    for start, xb in iter_batches(data, batch_size):
        code[start : start + len(xb)] = (xb.view(np.uint32).astype(np.uint64) * mult).sum(1)
        zero[start : start + len(xb)] = ~xb.any(1)
    order = np.argsort(code, kind="stable")
    new = np.r_[True, code[order][1:] != code[order][:-1]]
    del code
    rep = np.empty(n, np.int64)
    rep[order] = order[np.maximum.accumulate(np.where(new, np.arange(n), 0))]
    del order, new
    rep[zero] = np.nonzero(zero)[0]
    copies = np.nonzero(rep != np.arange(n))[0]
    for s in range(0, len(copies), batch_size):  # a shared code is checked: equal vectors, not a hash collision
        c = copies[s : s + batch_size]
        same = (take_rows(data, c) == take_rows(data, rep[c])).all(1)
        rep[c[~same]] = c[~same]
    return rep


def measure_recall(
    data: Data,
    pairs: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    queries: int = 1000,
    seed: int = 0,
    batch_size: int = 16384,
) -> dict:
    """Recall of found pairs against an exact search, with its count: a random sample of `queries` rows, half from
    rows found in a duplicate component and half from the others (weighted back to the pool), every exact pair with
    cosine >= threshold that involves them, and whether the found pairs put its two rows in one component."""
    n = num_rows(data)
    comp = components(n, pairs)
    linked = np.zeros(n, bool)
    linked[pairs.ravel()] = True
    rng = np.random.default_rng(seed)
    strata = [np.nonzero(linked)[0], np.nonzero(~linked)[0]]
    sizes = [min(len(s), max(queries // 2, queries - len(strata[1 - i]))) for i, s in enumerate(strata)]
    picked = [np.sort(rng.choice(s, size=k, replace=False)) for s, k in zip(strata, sizes, strict=True)]
    rows = np.concatenate(picked)
    weight = np.concatenate([np.full(k, len(s) / max(k, 1)) for s, k in zip(strata, sizes, strict=True)])
    q = normalize(take_rows(data, rows))
    exact, hit = np.zeros(len(rows)), np.zeros(len(rows))
    for start, xb in iter_batches(data, batch_size):
        a, b = np.nonzero(q @ normalize(xb).T >= threshold)
        b = b + start
        other = rows[a] != b
        a, b = a[other], b[other]
        np.add.at(exact, a, 1)
        np.add.at(hit, a, comp[rows[a]] == comp[b])
    total = float((weight * exact).sum())
    return {
        "queries": len(rows),
        "exact_pairs": int(exact.sum()),
        "missed_pairs": int((exact - hit).sum()),
        "recall": float((weight * hit).sum()) / total if total else None,
    }


@dataclass
class DedupResult:
    """keep: sorted row indices kept (one per component); component: every row's component, named by its lowest
    row; pairs/similarity: the near-duplicate pairs that link the components (a spanning forest); plan: the index."""

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


def dedup(
    data: Data,
    threshold: float = DEFAULT_THRESHOLD,
    plan: IndexPlan | str = "auto",
    gpu: bool = False,
    seed: int = 0,
    batch_size: int = 16384,
) -> DedupResult:
    """De-duplicate: link rows with cosine >= threshold, keep the lowest row of each component. Bit-identical
    copies are collapsed before the search and pairs fold into a `Forest` as found: memory is bounded by the rows."""
    plan = _require_plan(data, plan)
    n = num_rows(data)
    rep = exact_copies(data, batch_size)
    ids = np.nonzero(rep == np.arange(n))[0]
    forest = Forest(n)
    copies = np.nonzero(rep != np.arange(n))[0]
    forest.add(np.stack([rep[copies], copies], 1), np.ones(len(copies), np.float32))
    search = _for_rows(plan, len(ids))
    if len(ids) > 1:
        for pairs, score in _candidates(data, search, threshold, gpu, seed, batch_size, ids):
            forest.add(*_confirm(data, search, pairs, score, threshold))
    if distributed.world_size() > 1:
        merged = Forest(n)
        for pairs, sims in distributed.gather_objects(forest.edges()):
            merged.add(pairs, sims)
        forest = merged
    pairs, _ = forest.edges()
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    comp = forest.labels()
    return DedupResult(np.unique(comp), comp, pairs, _rescore(data, pairs), plan)


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
    lo, hi = _share(n)
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

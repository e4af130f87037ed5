"""Curation at scale, on small data: the index plan's rules (hand-computed), approximate duplicate search against
brute force, the recall report, memory-mapped shards read without an fp32 copy of the pool, the pool-size rule of
hierarchical k-means, and dedup / near-reference search over 2 processes (gloo) against 1."""

import numpy as np
import pytest

from dinoforge.curate import store
from dinoforge.curate.dedup import (
    FLAT_MAX_ROWS,
    components,
    dedup,
    duplicate_pairs,
    measure_recall,
    near_reference,
    plan_index,
)
from dinoforge.curate.kmeans import auto_levels
from dinoforge.curate.store import normalize
from dinoforge.utils import DinoforgeError


def test_plan_index_rules():
    assert plan_index(FLAT_MAX_ROWS, 384).index == "flat"
    p = plan_index(1_000_000, 384, memory_bytes=2**40)
    assert (p.index, p.nlist, p.nprobe, p.train_size, p.margin) == ("ivf", 2048, 4, 39 * 2048, 0.002)
    # float16 store + list probes, their sort and the row maps (12 * 4 + 16) + collapse and union-find (32)
    assert p.index_bytes == 1_000_000 * (384 * 2 + 64 + 32) + 2048 * 384 * 4
    assert plan_index(100_000, 384, memory_bytes=2**40).nlist == 512  # 2 sqrt(1e5) = 632 -> 2^9
    assert plan_index(100_000, 384, "ivfsq8").nlist == 1024  # faiss list scans: 4 sqrt(1e5) = 1265 -> 2^10
    # 10M x 384: the float16 join store takes 8.6 GB, SQ8 lists with kept probes 4.7 GB, PQ (64 bytes a vector) 1.5 GB
    assert plan_index(10_000_000, 384, memory_bytes=12 * 2**30).index == "ivf"
    assert plan_index(10_000_000, 384, memory_bytes=5 * 2**30).index == "ivfsq8"
    assert plan_index(10_000_000, 384, memory_bytes=4 * 2**30).index == "ivfpq"
    assert plan_index(10_000_000, 384, memory_bytes=2 * 2**30).index == "ivfpq"
    assert plan_index(1000, 8, "ivf").nlist == 1000 // 39  # at least 39 training rows per list
    with pytest.raises(DinoforgeError, match="unknown index type 'hnsw'"):
        plan_index(10, 8, "hnsw")


def test_auto_levels_follow_the_paper_proportions():
    # 743M -> 10M -> 500k -> 50k -> 10k: ratios 74.3, 20, 10, 5
    assert auto_levels(1_000_000) == ([13459, 673, 67, 13], 10)
    assert auto_levels(10_000) == ([135, 7], 20)
    assert auto_levels(50) == ([1], 20)


def groups_pool(n_groups=60, n_single=2500, d=32, seed=0):
    """Singletons plus groups of 2-6 near copies (a group is bigger than the first k-NN search's k)."""
    rng = np.random.default_rng(seed)
    x = [rng.normal(size=(n_single, d))]
    for g in range(n_groups):
        base = rng.normal(size=(1, d))
        x.append(base + 0.03 * rng.normal(size=(2 + g % 5, d)))
    x = np.concatenate(x).astype(np.float32)
    return x[rng.permutation(len(x))]


def brute_pairs(x, threshold):
    s = normalize(x) @ normalize(x).T
    return {(i, j) for i, j in np.argwhere(np.triu(s >= threshold, 1)).tolist()}, s


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq8", "ivfpq"])
def test_planned_search_matches_brute_force(kind):
    x = groups_pool()
    truth, s = brute_pairs(x, 0.9)
    assert len(truth) > 300
    plan = plan_index(len(x), x.shape[1], kind, nlist=16, nprobe=16, k=3)  # k=3 < group sizes: range completion
    pairs, sims = duplicate_pairs(x, 0.9, plan, batch_size=500)
    assert {tuple(p) for p in pairs.tolist()} == truth
    np.testing.assert_allclose(sims, s[pairs[:, 0], pairs[:, 1]], atol=1e-5)  # lossy storage is re-scored exactly


def straddling_pool(n=3000, copies=1500, d=16, seed=0):
    """Rows and noisy copies of half of them, near the threshold, so that many pairs straddle two IVF lists."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return np.concatenate([x, x[:copies] + 0.3 * rng.normal(size=(copies, d))]).astype(np.float32)


def faiss_range_pairs(x, plan, threshold, both_sides=True):
    """faiss's own IVFFlat over the same training rows (so the same lists), a range search of every row, the pairs
    kept from both sides (or only from the lower row, as the one-sided filter did)."""
    import faiss

    xn = normalize(x)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], plan.nlist, faiss.METRIC_INNER_PRODUCT)
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=plan.train_size, replace=False))
    index.train(xn[rows])
    index.add(xn)
    index.nprobe = plan.nprobe
    lims, _, ids = index.range_search(xn, threshold)
    q = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    keep = q != ids if both_sides else q < ids
    return {(min(a, b), max(a, b)) for a, b in zip(q[keep].tolist(), ids[keep].tolist(), strict=True)}


@pytest.mark.parametrize("nprobe", [2, 4])
@pytest.mark.parametrize("kind", ["ivf", "ivfsq8"])
def test_every_pair_of_a_symmetric_faiss_range_search_is_found(kind, nprobe):
    x = straddling_pool()
    plan = plan_index(len(x), x.shape[1], kind, nlist=128, nprobe=nprobe)
    truth = faiss_range_pairs(x, plan, 0.9)
    assert len(truth - faiss_range_pairs(x, plan, 0.9, both_sides=False)) > 5  # the one-sided filter loses pairs
    pairs, _ = duplicate_pairs(x, 0.9, plan)
    assert {tuple(p) for p in pairs.tolist()} == truth
    assert (components(len(x), pairs) == dedup(x, 0.9, plan).component).all()


def test_recall_report_against_exact_search():
    x = groups_pool()
    truth, _ = brute_pairs(x, 0.9)
    pairs = np.array(sorted(truth))
    full = measure_recall(x, pairs, 0.9, queries=len(x))
    assert full == {"queries": len(x), "exact_pairs": 2 * len(truth), "missed_pairs": 0, "recall": 1.0}
    # drop the pairs of one whole group: its rows are apart, every other group is still one component
    comp = components(len(x), pairs)
    group = comp[pairs[0, 0]]
    lost = pairs[comp[pairs[:, 0]] == group]
    part = measure_recall(x, pairs[comp[pairs[:, 0]] != group], 0.9, queries=len(x))
    assert part["missed_pairs"] == 2 * len(lost)
    assert part["recall"] == pytest.approx(1 - len(lost) / len(truth))
    # a sample: half its queries from rows in a found component, so a few hundred queries see many pairs
    sample = measure_recall(x, pairs, 0.9, queries=200, seed=1)
    assert sample["queries"] == 200 and sample["exact_pairs"] > 150 and sample["recall"] == 1.0


def test_memory_mapped_fp16_shards_are_never_materialised(tmp_path, monkeypatch):
    x = groups_pool().astype(np.float16)
    for i, s in enumerate(range(0, len(x), 700)):
        np.save(tmp_path / f"s{i}.npy", x[s : s + 700])
    shards = [np.load(tmp_path / f"s{i}.npy", mmap_mode="r") for i in range((len(x) + 699) // 700)]

    def refuse(_data):
        raise AssertionError("the whole pool was converted to one fp32 array")

    monkeypatch.setattr(store, "to_array", refuse)
    plan = plan_index(len(x), x.shape[1], "ivf", nlist=16, nprobe=16)
    res = dedup(shards, 0.9, plan)
    truth, _ = brute_pairs(x.astype(np.float32), 0.9)
    assert (res.component == components(len(x), np.array(sorted(truth)))).all()
    hit, best, _ = near_reference(shards, np.asarray(shards[1][:5]), 0.99)
    assert hit[700:705].all() and np.allclose(best[700:705], 1.0, atol=1e-3)


def _dist_worker(rank, world, init_file, x, ref, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plan = plan_index(len(x), x.shape[1], "ivf", nlist=16, nprobe=4, k=3)
        res = dedup(x, 0.9, plan)
        hit, best, idx = near_reference(x, ref, 0.9, batch_size=300)
        np.savez(f"{out_dir}/r{rank}.npz", comp=res.component, keep=res.keep, hit=hit, best=best, idx=idx)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_dedup_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    x = groups_pool()
    ref = x[::50] + 0.01
    plan = plan_index(len(x), x.shape[1], "ivf", nlist=16, nprobe=4, k=3)
    one = dedup(x, 0.9, plan)
    hit, best, idx = near_reference(x, ref, 0.9)
    mp.start_processes(_dist_worker, args=(2, tmp_path / "init", x, ref, tmp_path), nprocs=2, start_method="spawn")
    for r in (0, 1):
        got = np.load(tmp_path / f"r{r}.npz")
        np.testing.assert_array_equal(got["comp"], one.component)
        np.testing.assert_array_equal(got["keep"], one.keep)
        np.testing.assert_array_equal(got["hit"], hit)
        np.testing.assert_array_equal(got["idx"], idx)
        np.testing.assert_allclose(got["best"], best, atol=1e-6)


def test_placeholder_cluster_is_one_component_in_bounded_pairs():
    x = groups_pool()
    placeholder = np.random.default_rng(5).normal(size=x.shape[1]).astype(np.float32)
    rows = np.arange(100, len(x), 3)
    y = x.copy()
    y[rows] = placeholder  # a third of the pool is one "image unavailable" vector
    y[rows[:20]] += 1e-3  # and a few near copies of it, found by the search
    truth, _ = brute_pairs(y, 0.9)
    assert len(truth) > 50 * len(y)  # the pairs grow with the square of the cluster
    res = dedup(y, 0.9, plan_index(len(y), y.shape[1], "ivf", nlist=16, nprobe=4))
    assert (res.component == components(len(y), np.array(sorted(truth)))).all()
    assert len(res.pairs) == len(y) - len(res.keep)  # a spanning forest: one pair per removed row
    assert (res.similarity >= 0.9).all()


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda a, b: a.__setitem__((7, 3), np.nan), r"s0.npy: row 7 holds NaN"),
        (lambda a, b: b.__setitem__((2, 0), np.inf), r"s1.npy: row 2 holds NaN or infinite"),
    ],
)
def test_nan_rows_are_one_line_naming_the_shard(tmp_path, damage, needle):
    x = groups_pool()[:2000]
    a, b = x[:1000].copy(), x[1000:].copy()
    damage(a, b)
    np.save(tmp_path / "s0.npy", a)
    np.save(tmp_path / "s1.npy", b)
    shards = [np.load(tmp_path / f"s{i}.npy", mmap_mode="r") for i in (0, 1)]
    for plan in ("flat", plan_index(2000, x.shape[1], "ivf", nlist=16), plan_index(2000, x.shape[1], "ivfsq8")):
        with pytest.raises(DinoforgeError, match=needle):
            dedup(shards, 0.9, plan)


def test_mixed_widths_are_one_line(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 8), np.float32))
    np.save(tmp_path / "b.npy", np.ones((5, 6), np.float32))
    shards = [np.load(tmp_path / f"{k}.npy", mmap_mode="r") for k in "ab"]
    with pytest.raises(DinoforgeError, match="b.npy holds 6-wide vectors, .*a.npy 8-wide"):
        dedup(shards, 0.9)


def test_peak_memory_follows_the_plan_with_or_without_a_placeholder_cluster(tmp_path):
    """numpy's allocations during dedup (tracemalloc sees them; the join path has no faiss storage) against the
    plan's estimate, for a pool and for the same pool with a tenth of it one repeated vector."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n, d = 100_000, 64
    x = rng.normal(size=(n, d)).astype(np.float16)
    copies = rng.choice(n, n // 10, replace=False)
    peaks = []
    for name in ("plain", "placeholder"):
        if name == "placeholder":
            x[copies] = x[copies[0]]
        np.save(tmp_path / f"{name}.npy", x)
        plan = plan_index(n, d, "ivf")
        tracemalloc.start()
        res = dedup([np.load(tmp_path / f"{name}.npy", mmap_mode="r")], 0.9, plan)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert 0.5 * plan.index_bytes < peaks[-1] < 1.5 * plan.index_bytes, (name, peaks[-1], plan.index_bytes)
    assert len(np.unique(res.component[copies])) == 1
    assert peaks[1] < 1.5 * peaks[0]


def test_missing_shard_files_are_one_line_naming_them(tmp_path):
    from dinoforge.curate.store import EmbeddingStore
    from dinoforge.utils import write_json

    for s in range(3):
        np.save(tmp_path / f"shard_{s:05d}.npy", np.ones((2, 4), np.float16))
        write_json(tmp_path / f"shard_{s:05d}.json", {"paths": [f"{s}a", f"{s}b"], "skipped": [], "embedder": None})
    assert len(EmbeddingStore.open(tmp_path)) == 6
    (tmp_path / "shard_00001.npy").unlink()
    with pytest.raises(DinoforgeError, match=r"cannot read embedding shard .*shard_00001.npy"):
        EmbeddingStore.open(tmp_path)
    np.save(tmp_path / "shard_00001.npy", np.ones((2, 4), np.float16))
    (tmp_path / "shard_00002.json").unlink()  # its vectors would be dropped without a word
    with pytest.raises(DinoforgeError, match=r"shard_00002.npy has no .json file list \(1 such shards\)"):
        EmbeddingStore.open(tmp_path)

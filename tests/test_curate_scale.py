"""Curation at scale, on small data: the index plan's rules (hand-computed), approximate duplicate search against
brute force, the recall report, memory-mapped shards read without an fp32 copy of the pool, the pool-size rule of
hierarchical k-means, and dedup / near-reference search over 2 processes (gloo) against 1."""

import numpy as np
import pytest

from dinoforge.curate import store
from dinoforge.curate.dedup import (
    FLAT_MAX_ROWS,
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
    assert p.index_bytes == 1_000_000 * (384 * 2 + 40) + 2048 * 384 * 4  # float16 store + list bookkeeping
    assert plan_index(100_000, 384, memory_bytes=2**40).nlist == 512  # 2 sqrt(1e5) = 632 -> 2^9
    assert plan_index(100_000, 384, "ivfsq8").nlist == 1024  # faiss list scans: 4 sqrt(1e5) = 1265 -> 2^10
    # 10M x 384: the float16 join store takes 8.1 GB, SQ8 lists 3.9 GB, PQ (64 bytes a vector) 0.72 GB
    assert plan_index(10_000_000, 384, memory_bytes=12 * 2**30).index == "ivf"
    assert plan_index(10_000_000, 384, memory_bytes=4 * 2**30).index == "ivfsq8"
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


def test_recall_report_against_exact_search():
    x = groups_pool()
    truth, _ = brute_pairs(x, 0.9)
    pairs = np.array(sorted(truth))
    full = measure_recall(x, pairs, 0.9, queries=len(x))
    assert full == {
        "queries": len(x),
        "exact_pairs": len(truth),
        "found_pairs": len(truth),
        "recall": 1.0,
        "precision": 1.0,
    }
    half = measure_recall(x, pairs[::2], 0.9, queries=len(x))
    assert half["recall"] == pytest.approx(len(pairs[::2]) / len(truth))
    sample = measure_recall(x, pairs[::2], 0.9, queries=500, seed=1)
    rows = np.sort(np.random.default_rng(1).choice(len(x), 500, replace=False))
    involved = [p for p in truth if p[0] in rows or p[1] in rows]
    assert sample["exact_pairs"] == len(involved)


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
    assert {tuple(p) for p in res.pairs.tolist()} == truth
    hit, best, _ = near_reference(shards, np.asarray(shards[1][:5]), 0.99)
    assert hit[700:705].all() and np.allclose(best[700:705], 1.0, atol=1e-3)


def _dist_worker(rank, world, init_file, x, ref, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plan = plan_index(len(x), x.shape[1], "ivf", nlist=16, nprobe=4, k=3)
        res = dedup(x, 0.9, plan)
        hit, best, idx = near_reference(x, ref, 0.9, batch_size=300)
        np.savez(f"{out_dir}/r{rank}.npz", pairs=res.pairs, keep=res.keep, hit=hit, best=best, idx=idx)
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
        np.testing.assert_array_equal(got["pairs"], one.pairs)
        np.testing.assert_array_equal(got["keep"], one.keep)
        np.testing.assert_array_equal(got["hit"], hit)
        np.testing.assert_array_equal(got["idx"], idx)
        np.testing.assert_allclose(got["best"], best, atol=1e-6)

"""Curation algorithms on numpy embeddings, checked against sklearn, brute-force numpy and hand-computed
values."""

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from dinoforge.curate.dedup import components, dedup, duplicate_pairs, near_reference, plan_index
from dinoforge.curate.kmeans import Hierarchy, hierarchical_kmeans, kmeans_faiss, kmeans_lloyd
from dinoforge.curate.retrieve import cluster_based, retrieve, sample_based
from dinoforge.curate.sample import balanced_sample, size_entropy, split_budget
from dinoforge.curate.store import normalize
from dinoforge.utils import DinoforgeError


def blobs(n=3000, k=8, d=16, sep=6.0, seed=0, weights=None):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * sep
    lab = rng.choice(k, size=n, p=weights)
    return (centres[lab] + rng.normal(size=(n, d))).astype(np.float32), lab


def numpy_lloyd(x, init, niter):
    c = init.astype(np.float64)
    x = x.astype(np.float64)
    for _ in range(niter):
        a = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(len(c)):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    return c, a


def test_kmeans_faiss_matches_sklearn_partition_and_inertia():
    x, lab = blobs()
    ours = kmeans_faiss(x, 8, niter=25, seed=1, nredo=5)
    ref = KMeans(8, n_init=5, random_state=0).fit(x)
    assert ours.inertia <= ref.inertia_ * 1.01
    init = x[np.random.default_rng(3).choice(len(x), 8, replace=False)]
    same_start = kmeans_faiss(x, 8, niter=50, init=init)
    ref1 = KMeans(8, init=init, n_init=1, max_iter=50, tol=0, algorithm="lloyd").fit(x)
    assert adjusted_rand_score(ref1.labels_, same_start.assign) == pytest.approx(1.0)
    assert same_start.inertia == pytest.approx(ref1.inertia_, rel=1e-4)
    brute = ((x - ours.centroids[ours.assign]) ** 2).sum()
    assert ours.inertia == pytest.approx(brute, rel=1e-4)


def test_lloyd_matches_numpy_reference_and_is_out_of_core():
    x, _ = blobs(n=600, k=5, d=8, sep=2.0)
    init = x[[3, 50, 100, 200, 400]]
    ours = kmeans_lloyd(x, 5, niter=6, init=init, batch_size=128)
    ref_c, ref_a = numpy_lloyd(x, init, 6)
    np.testing.assert_allclose(ours.centroids, ref_c, atol=1e-4)
    np.testing.assert_array_equal(ours.assign, ((x[:, None] - ours.centroids[None]) ** 2).sum(-1).argmin(1))
    shards = [x[:100].astype(np.float16), x[100:350].astype(np.float16), x[350:].astype(np.float16)]
    on_shards = kmeans_lloyd(shards, 5, niter=6, init=init, batch_size=64)
    on_array = kmeans_lloyd(np.concatenate(shards), 5, niter=6, init=init, batch_size=500)
    np.testing.assert_allclose(on_shards.centroids, on_array.centroids, atol=1e-5)
    np.testing.assert_array_equal(on_shards.assign, on_array.assign)


def test_kmeans_bad_k_and_empty():
    with pytest.raises(DinoforgeError, match="k-means"):
        kmeans_faiss(np.zeros((3, 4), np.float32), 5)
    with pytest.raises(DinoforgeError, match="empty"):
        kmeans_lloyd(np.zeros((0, 4), np.float32), 2)


def test_split_budget_hand_computed():
    rng = np.random.default_rng(0)
    assert split_budget(np.array([10, 3, 1]), 9, rng).tolist() == [5, 3, 1]
    assert split_budget(np.array([10, 3, 1]), 8, rng).tolist() == [4, 3, 1]
    assert split_budget(np.array([10, 3, 1]), 100, rng).tolist() == [10, 3, 1]
    share = split_budget(np.array([5, 5, 5, 1]), 10, rng)  # cap 3 gives 10 exactly: [3, 3, 3, 1]
    assert share.tolist() == [3, 3, 3, 1]
    share = split_budget(np.array([5, 5, 5]), 10, rng)  # cap 3 (9) + one extra unit somewhere
    assert sorted(share.tolist()) == [3, 3, 4]


def test_balanced_sampling_flattens_long_tail():
    k = 12
    w = 1.0 / np.arange(1, k + 1) ** 2
    x, lab = blobs(n=12000, k=k, d=16, sep=5.0, weights=w / w.sum())
    h = hierarchical_kmeans(x, [120, 24], niter=15, resample_steps=[0, 3], sample_sizes=[0, 3])
    picked = balanced_sample(h, 1200)
    assert len(picked) == 1200 == len(np.unique(picked))
    before, after = size_entropy(lab), size_entropy(lab[picked])
    uniform = size_entropy(lab[np.random.default_rng(0).choice(len(x), 1200, replace=False)])
    assert after > before + 0.1, (before, after)
    assert after > uniform + 0.1
    closest = balanced_sample(h, 1200, strategy="closest")
    assert len(np.unique(closest)) == 1200


def test_hierarchy_save_load(tmp_path):
    x, _ = blobs(n=500, k=4, d=8)
    h = hierarchical_kmeans(x, [20, 4], niter=5, resample_steps=1, sample_sizes=[5, 2])
    h2 = Hierarchy.load(h.save(tmp_path / "h.npz"))
    np.testing.assert_array_equal(h.point_clusters(), h2.point_clusters())
    ids = h.point_clusters()
    np.testing.assert_array_equal(ids[:, 1], h.levels[1].assign[h.levels[0].assign])


def planted(n=400, d=32, n_dup=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    src = rng.choice(n, n_dup, replace=False)
    copies = x[src] + 0.05 * rng.normal(size=(n_dup, d)).astype(np.float32)
    return np.concatenate([x, copies]), {(int(s), n + i) for i, s in enumerate(src)}


def test_duplicate_pairs_match_brute_force_all_engines():
    x, truth = planted()
    s = normalize(x) @ normalize(x).T
    brute = {(i, j) for i, j in np.argwhere(np.triu(s >= 0.9, 1)).tolist()}
    assert brute == truth
    for plan in ("auto", "flat", plan_index(len(x), x.shape[1], "ivf"), plan_index(len(x), x.shape[1], "flat", k=2)):
        pairs, sims = duplicate_pairs(x, 0.9, plan, batch_size=100)
        assert {tuple(p) for p in pairs.tolist()} == brute, plan
        np.testing.assert_allclose(sims, s[pairs[:, 0], pairs[:, 1]], atol=1e-5)


def test_dedup_components_keep_one_each():
    base = np.eye(6, dtype=np.float32)
    x = np.stack([base[0], base[0] + 0.01, base[1], base[0] + 0.02, base[2], base[2] * 2])
    res = dedup(x, 0.99)
    assert res.keep.tolist() == [0, 2, 4]
    assert res.removed.tolist() == [1, 3, 5]
    assert components(4, np.array([[0, 2]])).tolist()[0] == components(4, np.array([[0, 2]])).tolist()[2]
    with pytest.raises(DinoforgeError, match="empty"):
        dedup(np.zeros((0, 4), np.float32))


def test_near_reference_matches_brute_force():
    rng = np.random.default_rng(1)
    pool, ref = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(30, 16)).astype(np.float32)
    pool[:5] = ref[[3, 4, 5, 6, 7]] * 2 + 0.01
    hit, best, idx = near_reference(pool, ref, 0.95)
    s = normalize(pool) @ normalize(ref).T
    np.testing.assert_allclose(best, s.max(1), atol=1e-5)
    assert np.nonzero(hit)[0].tolist() == np.nonzero(s.max(1) >= 0.95)[0].tolist() == [0, 1, 2, 3, 4]
    assert idx[:5].tolist() == [3, 4, 5, 6, 7]


def test_sample_based_retrieval_is_union_of_topk():
    rng = np.random.default_rng(2)
    pool, cur = rng.normal(size=(300, 16)).astype(np.float32), rng.normal(size=(10, 16)).astype(np.float32)
    r = sample_based(pool, cur, k=4)
    s = normalize(cur) @ normalize(pool).T
    expected = set(np.argsort(-s, axis=1)[:, :4].ravel().tolist())
    assert set(r.rows.tolist()) == expected
    np.testing.assert_allclose(r.similarity, s[:, r.rows].max(0), atol=1e-5)


def test_cluster_based_retrieval_and_choice_by_size():
    x, lab = blobs(n=2000, k=10, d=16)
    cl = kmeans_faiss(x, 10, seed=0)
    query = x[lab == 3][:5]
    r = cluster_based(x, query, cl, m=50)
    expected = set(((query[:, None] - cl.centroids[None]) ** 2).sum(-1).argmin(1).tolist())
    got_clusters, counts = np.unique(cl.assign[r.rows], return_counts=True)
    assert set(got_clusters.tolist()) == expected
    assert all(c == min(50, (cl.assign == g).sum()) for g, c in zip(got_clusters, counts, strict=True))
    assert len(np.unique(r.rows)) == len(r.rows) and set(lab[r.rows].tolist()) == {3}
    got = retrieve(x, {"small": query, "big": x[:40]}, k=4, m=50, sample_min_size=20, pool_clusters=cl)
    assert got["small"].method == "cluster" and got["big"].method == "sample"
    with pytest.raises(DinoforgeError, match="empty"):
        retrieve(x, {"none": np.zeros((0, 16), np.float32)})
    with pytest.raises(DinoforgeError, match="no curated"):
        retrieve(x, {})


def _dist_worker(rank, world, init_file, x, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bounds = [len(x) * r // world for r in range(world + 1)]
        res = kmeans_lloyd(x[bounds[rank] : bounds[rank + 1]], 6, niter=8, seed=3, batch_size=100)
        h = hierarchical_kmeans(x, [12, 3], niter=5, engine="lloyd")
        np.savez(f"{out_dir}/r{rank}.npz", c=res.centroids, a=res.assign, inertia=res.inertia, h=h.point_clusters())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_lloyd_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    x, _ = blobs(n=900, k=6, d=8, sep=3.0)
    one = kmeans_lloyd(x, 6, niter=8, seed=3, batch_size=100)
    one_h = hierarchical_kmeans(x, [12, 3], niter=5, engine="lloyd")
    mp.start_processes(_dist_worker, args=(2, tmp_path / "init", x, tmp_path), nprocs=2, start_method="spawn")
    r0, r1 = np.load(tmp_path / "r0.npz"), np.load(tmp_path / "r1.npz")
    np.testing.assert_allclose(r0["c"], one.centroids, atol=1e-5)
    np.testing.assert_array_equal(r1["c"], r0["c"])
    np.testing.assert_array_equal(np.concatenate([r0["a"], r1["a"]]), one.assign)
    assert float(r0["inertia"]) == pytest.approx(one.inertia, rel=1e-6)
    np.testing.assert_array_equal(r0["h"], one_h.point_clusters())
    np.testing.assert_array_equal(r1["h"], one_h.point_clusters())

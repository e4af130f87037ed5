"""k-NN: weighted vote vs an independent numpy version, majority vote vs sklearn, chunking, sharding."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.neighbors import KNeighborsClassifier

from dinoforge.eval.knn import few_shot_indices, knn_classify, knn_evaluate, topk_accuracy


def _clustered(n_train=600, n_test=150, dim=16, classes=5, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    ytr = rng.integers(0, classes, n_train)
    yte = rng.integers(0, classes, n_test)
    xtr = centres[ytr] + noise * rng.normal(size=(n_train, dim))
    xte = centres[yte] + noise * rng.normal(size=(n_test, dim))
    return (
        torch.tensor(xtr, dtype=torch.float32),
        torch.tensor(ytr),
        torch.tensor(xte, dtype=torch.float32),
        torch.tensor(yte),
    )


def _numpy_weighted_vote(xtr, ytr, xte, k, T, classes):
    """Independent reference: full similarity matrix, argsort, exp(sim/T) votes normalised over max-k."""
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sims = b @ a.T
    order = np.argsort(-sims, axis=1)[:, :k]
    scores = np.zeros((len(xte), classes))
    for i in range(len(xte)):
        w = np.exp(sims[i, order[i]] / T)
        for j, idx in enumerate(order[i]):
            scores[i, ytr[idx]] += w[j]
    return scores


def test_weighted_vote_matches_numpy_reference():
    xtr, ytr, xte, _ = _clustered()
    ks, T = (1, 10, 20, 50), 0.07
    out = knn_classify(xtr, ytr, xte, ks=ks, T=T, num_classes=5)
    norm = None
    for k in sorted(ks, reverse=True):
        ref = _numpy_weighted_vote(xtr.double().numpy(), ytr.numpy(), xte.double().numpy(), k, T, 5)
        if norm is None:  # official normalisation: softmax over the max(ks) neighbours
            norm = ref.sum(1, keepdims=True)
        np.testing.assert_allclose(out[k].numpy(), ref / norm, rtol=1e-4, atol=1e-6)
        assert (out[k].argmax(1).numpy() == ref.argmax(1)).all()


def test_majority_vote_matches_sklearn_cosine():
    # A huge temperature makes every weight equal, i.e. a plain majority vote (odd k, 2 classes: no ties).
    xtr, ytr, xte, _ = _clustered(classes=2, noise=2.0)
    for k in (1, 5, 15):
        ours = knn_classify(xtr, ytr, xte, ks=(k,), T=1e6, num_classes=2)[k].argmax(1)
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(xtr.numpy(), ytr.numpy())
        np.testing.assert_array_equal(ours.numpy(), sk.predict(xte.numpy()))


def test_chunked_equals_unchunked():
    xtr, ytr, xte, _ = _clustered(n_train=1000, n_test=300)
    full = knn_classify(xtr, ytr, xte, ks=(10, 20, 100), num_classes=5)
    chunked = knn_classify(xtr, ytr, xte, ks=(10, 20, 100), num_classes=5, chunk_size=37, train_chunk=53)
    for k in full:
        torch.testing.assert_close(full[k], chunked[k], rtol=1e-5, atol=1e-6)


def test_k_larger_than_train_set_uses_all_neighbours():
    xtr, ytr, xte, _ = _clustered(n_train=8, n_test=4)
    out = knn_classify(xtr, ytr, xte, ks=(20,), num_classes=5, train_chunk=3)
    torch.testing.assert_close(out[20].sum(1), torch.ones(4))


def test_accuracy_separable_and_random_labels():
    xtr, ytr, xte, yte = _clustered(noise=0.1)
    res = knn_evaluate(xtr, ytr, xte, yte, ks=(10, 20))
    assert res["full"]["k=10"]["top1"] == 100.0
    rng = torch.Generator().manual_seed(1)
    xtr, xte = torch.randn(2000, 32, generator=rng), torch.randn(1000, 32, generator=rng)
    ytr, yte = torch.randint(0, 10, (2000,), generator=rng), torch.randint(0, 10, (1000,), generator=rng)
    top1 = knn_evaluate(xtr, ytr, xte, yte, ks=(20,))["full"]["k=20"]["top1"]
    assert 5.0 < top1 < 15.0  # chance is 10%


def test_topk_accuracy_hand_worked():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    acc = topk_accuracy(scores, labels, topk=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == 100.0


def test_few_shot_subsets():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = few_shot_indices(labels, 4, seed=0)
    counts = torch.bincount(labels[idx])
    assert counts.tolist() == [4, 3, 4]
    assert torch.equal(idx, few_shot_indices(labels, 4, seed=0))
    assert not torch.equal(idx, few_shot_indices(labels, 4, seed=1))
    xtr, ytr, xte, yte = _clustered(noise=0.1)
    res = knn_evaluate(xtr, ytr, xte, yte, ks=(10, 20), n_per_class=(5,), n_tries=2)
    assert set(res["5_per_class"]["mean"]) == {"k=5"}
    assert len(res["5_per_class"]["tries"]) == 2


def _sharded_worker(rank, world, port, xtr, ytr, xte, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = torch.arange(len(xtr)).tensor_split(world)[rank]
        # rank 1 gets fewer than max-k rows to exercise padding in the merge
        out = knn_classify(xtr[shard], ytr[shard], xte, ks=(5, 20), num_classes=None, train_chunk=7)
        yte = torch.arange(len(xte)) % 5
        full = knn_evaluate(xtr, ytr, xte, yte, ks=(5, 20), n_per_class=(3,), shard=(rank, world))
        q.put((rank, {k: v.numpy() for k, v in out.items()}, full))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sharded_equals_single_process():
    xtr, ytr, xte, _ = _clustered(n_train=30, n_test=40)
    xtr = torch.cat([xtr, xtr[:3]])  # uneven shards: 17 + 16 rows
    ytr = torch.cat([ytr, ytr[:3]])
    single = knn_classify(xtr, ytr, xte, ks=(5, 20), num_classes=None, distributed=False)
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_sharded_worker, args=(2, _free_port(), xtr, ytr, xte, q), nprocs=2, join=True)
    results = {}
    for _ in range(2):
        rank, scores, metrics = q.get()
        results[rank] = (scores, metrics)
    reference = knn_evaluate(xtr, ytr, xte, torch.arange(len(xte)) % 5, ks=(5, 20), n_per_class=(3,))
    for rank in (0, 1):
        for k in (5, 20):
            np.testing.assert_allclose(results[rank][0][k], single[k].numpy(), rtol=1e-5, atol=1e-6)
        assert results[rank][1] == reference

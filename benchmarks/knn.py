"""k-NN benchmark: dinoforge vs scikit-learn brute-force cosine neighbours and faiss IndexFlatIP.

Clustered random features (default 100k train × 10k test × 384 dims, 100 classes). Every peer finds the
k nearest train features by cosine similarity and applies the same temperature-weighted vote (T = 0.07,
done in numpy for the peers); predictions and neighbour similarities must agree. Prints one JSON line per
measurement, with each peer's time relative to dinoforge's in the same run.

    python benchmarks/knn.py [--n-train 100000 --n-test 10000 --dim 384 --k 20]
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from dinoforge.eval.knn import knn_classify, knn_neighbours


def clustered(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Gaussian clusters around random centres: separable, but with many confusable neighbours."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ytr = torch.randint(0, classes, (n_train,), generator=g)
    yte = torch.randint(0, classes, (n_test,), generator=g)
    xtr = centres[ytr] + 3.0 * torch.randn(n_train, dim, generator=g)
    xte = centres[yte] + 3.0 * torch.randn(n_test, dim, generator=g)
    return xtr, ytr, xte, yte


def vote(sims: np.ndarray, neighbour_labels: np.ndarray, T: float, classes: int) -> np.ndarray:
    """The official weighted vote on given neighbours: argmax over classes of sum exp(sim / T)."""
    w = np.exp((sims - sims[:, :1]) / T)
    scores = np.zeros((len(sims), classes))
    np.add.at(scores, (np.arange(len(sims))[:, None], neighbour_labels), w)
    return scores.argmax(1)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=100_000)
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--T", type=float, default=0.07)
    a = ap.parse_args()
    xtr, ytr, xte, yte = clustered(a.n_train, a.n_test, a.dim, a.classes)
    ytr_np = ytr.numpy()
    shape = dict(n_train=a.n_train, n_test=a.n_test, dim=a.dim, k=a.k, threads=torch.get_num_threads())

    scores, t_ours = timed(lambda: knn_classify(xtr, ytr, xte, ks=(a.k,), T=a.T, num_classes=a.classes))
    pred_ours = scores[a.k].argmax(1).numpy()

    def run_sklearn():
        sk = KNeighborsClassifier(n_neighbors=a.k, metric="cosine", algorithm="brute").fit(xtr.numpy(), ytr_np)
        dist, idx = sk.kneighbors(xte.numpy())
        return 1 - dist, idx, vote(1 - dist, ytr_np[idx], a.T, a.classes)

    def run_faiss():
        index = faiss.IndexFlatIP(a.dim)
        index.add(F.normalize(xtr, dim=1).numpy())
        sims, idx = index.search(F.normalize(xte, dim=1).numpy(), a.k)
        return sims, idx, vote(sims, ytr_np[idx], a.T, a.classes)

    (sk_sims, _, pred_sk), t_sk = timed(run_sklearn)
    (fa_sims, _, pred_fa), t_fa = timed(run_faiss)
    our_sims = knn_neighbours(xtr, ytr, xte, a.k)[0].numpy()
    np.testing.assert_allclose(our_sims, sk_sims, atol=1e-4)
    np.testing.assert_allclose(our_sims, fa_sims, atol=1e-4)
    same_sk, same_fa = float((pred_ours == pred_sk).mean()), float((pred_ours == pred_fa).mean())
    # a different prediction is only possible where neighbour similarities tie within float error
    assert same_sk > 0.999 and same_fa > 0.999, (same_sk, same_fa)
    for name, t in (("dinoforge", t_ours), ("sklearn_brute_cosine", t_sk), ("faiss_IndexFlatIP", t_fa)):
        row = dict(bench="knn", impl=name, **shape, seconds=round(t, 3), ratio_vs_dinoforge=round(t / t_ours, 3))
        print(json.dumps(row))
    top1 = float((pred_ours == yte.numpy()).mean()) * 100
    print(
        json.dumps(dict(bench="knn_agreement", **shape, top1=top1, same_pred_sklearn=same_sk, same_pred_faiss=same_fa))
    )


if __name__ == "__main__":
    main()

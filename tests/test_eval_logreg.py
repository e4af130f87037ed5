"""L-BFGS logistic regression vs scikit-learn's LogisticRegression (same objective), sweep behaviour."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from dinoforge.eval.logreg import default_c_grid, fit_logreg, logreg_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny full-batch problems


def _blobs(n, dim=12, classes=4, noise=1.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(classes, dim))
    y = rng.integers(0, classes, n)
    x = centres[y] + noise * rng.normal(size=(n, dim))
    return torch.tensor(x), torch.tensor(y)


@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_fit_matches_sklearn(C):
    x, y = _blobs(400)
    ours = fit_logreg(x, y, C)
    sk = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    # intercepts are only defined up to a shared shift, so compare weights (unique) and probabilities
    np.testing.assert_allclose(ours.weight.numpy(), sk.coef_, atol=2e-4 * max(1, np.abs(sk.coef_).max()))
    np.testing.assert_allclose(ours.predict_proba(x).numpy(), sk.predict_proba(x.numpy()), atol=1e-4)
    np.testing.assert_array_equal(ours.predict(x).numpy(), sk.predict(x.numpy()))


def test_sweep_picks_reasonable_c_and_matches_sklearn_accuracy():
    x, y = _blobs(600)
    xt, yt = _blobs(600, seed=1)
    res = logreg_evaluate(x, y, xt, yt, c_grid=default_c_grid(12))
    assert len(res["sweep"]) == 12
    sk = LogisticRegression(C=res["best_C"], tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    assert res["top1"] == pytest.approx(100 * sk.score(xt.numpy(), yt.numpy()), abs=0.2)
    assert res["top1"] > 80


def test_separable_and_random_labels():
    x, y = _blobs(300, noise=0.05)
    xt, yt = _blobs(300, noise=0.05, seed=1)
    assert logreg_evaluate(x, y, xt, yt, c_grid=[0.1, 10.0])["top1"] == 100.0
    g = torch.Generator().manual_seed(0)
    xr, yr = torch.randn(1000, 16, generator=g), torch.randint(0, 5, (1000,), generator=g)
    xtr, ytr = torch.randn(1000, 16, generator=g), torch.randint(0, 5, (1000,), generator=g)
    acc = logreg_evaluate(xr, yr, xtr, ytr, c_grid=default_c_grid(6))["top1"]
    assert 15 < acc < 25  # chance is 20%

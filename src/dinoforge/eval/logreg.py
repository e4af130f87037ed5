"""Multinomial logistic regression on frozen features, fit with full-batch L-BFGS in torch (DINOv2 §7).

The objective is scikit-learn's: 0.5 * ||W||^2 + C * sum of cross-entropies, intercept not penalised
(we minimise it divided by the number of samples, which has the same optimum). The strength C is swept
over a log grid, chosen on a held-out 10% of the train set (or a given validation set), then the model is
refit on all train features with the best C and scored on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinoforge.data.datasets import skipped_summary
from dinoforge.eval.features import labelled_features
from dinoforge.utils import DinoforgeError, track, write_json


def default_c_grid(n: int = 45) -> list[float]:
    """C values 10^-6 .. 10^5, log-spaced as in the official sweep (45 points)."""
    return [float(c) for c in np.logspace(-6, 5, n)]


class LogReg:
    """A fitted multinomial logistic regression: weight (classes × dim) and bias (classes)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight = weight
        self.bias = bias

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(dim=1)


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    C: float,
    num_classes: int | None = None,
    max_iter: int = 1000,
    tol: float = 1e-9,
    init: LogReg | None = None,
    dtype: torch.dtype = torch.float64,
) -> LogReg:
    """Minimise mean cross-entropy + ||W||^2 / (2 C N) with full-batch L-BFGS (strong-Wolfe line search)."""
    x = x.to(dtype)
    y = y.to(x.device).long()
    n, d = x.shape
    k = num_classes or int(y.max()) + 1
    w = torch.zeros(k, d, dtype=dtype, device=x.device) if init is None else init.weight.clone()
    b = torch.zeros(k, dtype=dtype, device=x.device) if init is None else init.bias.clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    reg = 1.0 / (2.0 * C * n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogReg(w.detach(), b.detach())


def _accuracy(model: LogReg, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model.predict(x).cpu() == y.cpu()).float().mean().item()


def logreg_evaluate(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    c_grid: Sequence[float] | None = None,
    val_x: torch.Tensor | None = None,
    val_y: torch.Tensor | None = None,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict:
    """Sweep C (held-out split or given val set), refit on all train with the best C, return test accuracy."""
    c_grid = list(c_grid or default_c_grid())
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    if val_x is None:
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(len(train_x) * val_fraction))
        if n_val >= len(train_x):
            raise DinoforgeError("train set too small to hold out a validation split")
        fit_x, fit_y = train_x[perm[n_val:]], train_y[perm[n_val:]]
        val_x, val_y = train_x[perm[:n_val]], train_y[perm[:n_val]]
    else:
        fit_x, fit_y = train_x, train_y
    sweep, model = {}, None
    for c in track(sorted(c_grid), "logreg C sweep", total=len(c_grid)):
        model = fit_logreg(fit_x, fit_y, c, num_classes, max_iter, init=model)
        sweep[c] = _accuracy(model, val_x, val_y)
    best_c = max(sweep, key=lambda c: (sweep[c], -c))
    final = fit_logreg(train_x, train_y, best_c, num_classes, max_iter)
    return {
        "best_C": best_c,
        "val_top1_best": sweep[best_c],
        "top1": _accuracy(final, test_x, test_y),
        "sweep": [{"C": c, "val_top1": a} for c, a in sweep.items()],
    }


def run_logreg_eval(
    net: torch.nn.Module,
    fingerprint: str,
    train_data: str,
    val_data: str,
    out: Path,
    *,
    n_c: int = 45,
    max_iter: int = 1000,
    image_size: int | None = None,
    batch_size: int = 64,
    use_cache: bool = True,
) -> dict:
    """Logistic regression on a backbone's CLS features, train → val data specs, over `n_c` values of C;
    writes metrics.json into `out` and returns the metrics."""
    tr, te = labelled_features(net, fingerprint, [train_data, val_data], out, batch_size, image_size, use_cache)
    metrics = logreg_evaluate(
        torch.from_numpy(tr["cls"][:, -1]),
        torch.from_numpy(tr["labels"]),
        torch.from_numpy(te["cls"][:, -1]),
        torch.from_numpy(te["labels"]),
        c_grid=default_c_grid(n_c),
        max_iter=max_iter,
    )
    metrics.update(
        train_data=train_data, val_data=val_data, **skipped_summary(tr["skipped_names"] + te["skipped_names"])
    )
    write_json(Path(out) / "metrics.json", metrics)
    return metrics

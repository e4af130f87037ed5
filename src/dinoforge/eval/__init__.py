"""Frozen-backbone evaluations: k-NN, linear probe, logistic regression, retrieval (and dense probes)."""

from dinoforge.eval.knn import knn_classify, knn_evaluate
from dinoforge.eval.linear import linear_probe
from dinoforge.eval.logreg import fit_logreg, logreg_evaluate
from dinoforge.eval.retrieval import labelled_retrieval, revisitop_map

__all__ = [
    "fit_logreg",
    "knn_classify",
    "knn_evaluate",
    "labelled_retrieval",
    "linear_probe",
    "logreg_evaluate",
    "revisitop_map",
]

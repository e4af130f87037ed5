"""Evaluation: knn (in progress)."""

from dinoforge.utils import DinoforgeError


def knn_command() -> None:
    """knn evaluation (in progress)."""
    raise DinoforgeError("eval knn: not implemented yet")
